"""Calibrate a generator's expected accuracy on real test images; write CHECKPOINT/quality.json.

    python -m evaluation.calibrate CHECKPOINT --zoo-config configs/zoo/fashion_mnist.yaml [key options]

What it measures (no zoo needed: the task plan is a pure function of the zoo config):
  1. pair_recall: every pair of vocabulary classes as a 2-class model with exact names, the recall of
     each class on its test images (the prior of tina/expected.py: collisions become a coin flip).
  2. fit rows: the zoo's val class sets (and unseen_class sets, whose held-out classes the vocabulary
     lacks), each under several prompt forms whose true classes are known:
       names          the exact class names
       related        each class as a WordNet synonym, broader or narrower term (or its head noun)
       paraphrase     hand-written paraphrases (evaluation/prompts.py HAND_PARAPHRASES)
       one_unrelated  one class replaced by an unrelated word
       unrelated      every class an unrelated word
     Each row keeps the matches `tina generate` computes (tina/expected.py) and the generated model's
     accuracy. From the fit rows: P(a class resolves to its true class | similarity, margin) (a
     logistic), then a logistic model in tina/expected.py's FEATURES predicting
     z = (accuracy - chance) / (1 - chance); 80% ranges are the 10th/90th residual percentiles (logit
     space) within quartiles of the resolution uncertainty.
  3. unknown threshold: the similarity at which a non-exact class resolves to its true class half the
     time (a 1-D logistic over every class of every degraded prompt of the fit rows).
  4. check: the unseen_combo class sets (never used for fitting), same forms: MAE and range coverage.
The measurements go to CHECKPOINT/quality_rows.json; `--refit` refits from them without generating.
Test images of each class are split in two halves (even / odd positions): pair_recall and the fit
use the first half, the check the second, so the check never sees a fitted image.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tina.errors import TinaError
from tina.expected import BIN_FEATURE, FEATURES, NEAR_CHANCE, QUALITY_FILE, QUALITY_FORMAT, ClassMatch, task_features

log = logging.getLogger(__name__)
ROWS_FILE = "quality_rows.json"  # the measurements behind quality.json (refit with --refit, no generation)
FORMS = ("names", "related", "paraphrase", "one_unrelated", "unrelated")
# Residual percentiles of the 80% range. In-sample 10th/90th percentiles covered only 72% of held-out
# rows in 5-fold cross-validation on the Fashion-MNIST fit rows; the 5th/95th covered 80%.
COVERAGE = (0.05, 0.95)
N_BINS = 4


@dataclass
class CalibrationConfig:
    """What to measure; defaults keep a Fashion-MNIST run at a few CPU-minutes."""

    checkpoint: str
    zoo_config: str  # the zoo's YAML: its tasks section gives the val / unseen_combo / unseen_class sets
    images_per_class: int = 200  # test images per class and half (fit / check)
    max_tasks: int = 0  # per split (0 = all)
    forms: tuple[str, ...] = FORMS
    seed: int = 0
    out: str | None = None  # default CHECKPOINT/quality.json
    batch_size: int = 256


def related_term(name: str, rng: random.Random) -> str | None:
    """A synonym, broader or narrower term of a class (WordNet), else its head noun, else None."""
    from tina.prompts import wordnet_relations

    rel = wordnet_relations(name) or {}
    pool = list(rel.get("synonyms", [])) + list(rel.get("broader", [])[:1]) + list(rel.get("narrower", [])[:4])
    if len(name.split()) > 1:
        pool.append(name.split()[-1])
    pool = [w for w in pool if w != name]
    return rng.choice(pool) if pool else None


def form_texts(form: str, classes: list[str], rng: random.Random) -> list[str] | None:
    """The class texts of a prompt form for a task (None: the form does not apply)."""
    from evaluation.prompts import HAND_PARAPHRASES, UNRELATED_WORDS, unrelated_words

    if form == "names":
        return list(classes)
    if form == "related":
        texts = [related_term(c, rng) or c for c in classes]
        return texts if texts != classes else None
    if form == "paraphrase":
        texts = [HAND_PARAPHRASES.get(c, c) for c in classes]
        return texts if texts != classes else None
    if form == "one_unrelated":
        texts = list(classes)
        texts[rng.randrange(len(texts))] = rng.choice(UNRELATED_WORDS)
        return texts
    if form == "unrelated":
        return unrelated_words(rng, len(classes))
    raise TinaError(f"unknown calibration form {form!r}; choose from {FORMS}")


def half_indices(y: np.ndarray, c: int, half: int, n: int) -> np.ndarray:
    """Test image indices of class c: even (half 0) or odd (half 1) positions, first n."""
    return np.flatnonzero(y == c)[half::2][:n]


def task_images(ds, class_ids: list[int], half: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = [half_indices(ds.test_y, c, half, n) for c in class_ids]
    x, _ = ds.tensors("test", np.concatenate(idx))
    y = torch.cat([torch.full((len(i),), pos, dtype=torch.long) for pos, i in enumerate(idx)])
    return x, y


def _flats(tina, tasks: list, seed: int, batch_size: int) -> list[torch.Tensor]:
    """Generated flat vectors of many tasks, batched by k (one DDIM call per chunk)."""
    order = sorted(range(len(tasks)), key=lambda i: len(tasks[i].classes))
    out: list[torch.Tensor | None] = [None] * len(tasks)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        nets = tina.generate_tasks([tasks[i] for i in chunk], seed=seed)
        for i, net in zip(chunk, nets):
            out[i] = tina.bundle.layout.flatten(net.state_dict())
    return out


def pair_recall(tina, ds, vocab_ids: dict[int, int], cfg: CalibrationConfig) -> list[list[float | None]]:
    """(V, V) recall of class c in the exact-name 2-class model [c, d] on fit-half images; None unmeasured."""
    from evaluation.scoring import flat_accuracies

    V = len(tina.bundle.vocab)
    pairs = [(a, b) for a in vocab_ids for b in vocab_ids if a < b]  # dataset ids
    names = tina.bundle.vocab
    tasks = [tina.make_task(classes=[names[vocab_ids[a]], names[vocab_ids[b]]]) for a, b in pairs]
    flats = _flats(tina, tasks, cfg.seed, cfg.batch_size)
    table: list[list[float | None]] = [[None] * V for _ in range(V)]
    for (a, b), flat in zip(pairs, flats):
        for pos, c in enumerate((a, b)):
            x, _ = ds.tensors("test", half_indices(ds.test_y, c, 0, cfg.images_per_class))
            y = torch.full((len(x),), pos, dtype=torch.long)
            r = float(flat_accuracies(tina.bundle, flat[None], 2, x, y)[0])
            table[vocab_ids[c]][vocab_ids[(a, b)[1 - pos]]] = round(r, 4)
    return table


def measure(tina, ds, plan_tasks: list, split: str, half: int, cfg: CalibrationConfig) -> list[dict]:
    """One row per (task, form): features, the true-class resolution of each class, and the accuracy."""
    from evaluation.scoring import flat_accuracies

    vocab_index = {n: i for i, n in enumerate(tina.bundle.vocab)}
    items = []  # (task, form, true ids, Task)
    for t in plan_tasks:
        classes = [ds.classes[c] for c in t.classes]
        for form in cfg.forms:
            rng = random.Random(f"{cfg.seed}-{t.task_id}-{form}")
            texts = form_texts(form, classes, rng)
            if texts is None:
                continue
            try:
                task = tina.make_task(classes=texts)
            except TinaError:  # two terms that normalise to the same name: not a valid prompt
                continue
            items.append((t, form, task))
    flats = _flats(tina, [it[2] for it in items], cfg.seed, cfg.batch_size)
    rows, images = [], {}
    for (t, form, task), flat in zip(items, flats):
        if t.task_id not in images:
            images[t.task_id] = task_images(ds, list(t.classes), half, cfg.images_per_class)
        x, y = images[t.task_id]
        acc = float(flat_accuracies(tina.bundle, flat[None], len(t.classes), x, y)[0])
        truth = [vocab_index.get(ds.classes[c]) for c in t.classes]
        rows.append({
            "split": split, "task": t.task_id, "form": form, "k": len(t.classes), "accuracy": round(acc, 5),
            "matches": [asdict(m) | {"similarity": round(m.similarity, 5), "margin": round(m.margin, 5),
                                     "resolved_true": m.index == tr} for m, tr in zip(task.assessment.matches, truth)],
        })
    return rows


def _matches(row: dict) -> list[ClassMatch]:
    return [ClassMatch(**{k: v for k, v in m.items() if k != "resolved_true"}) for m in row["matches"]]


# ---- fitting --------------------------------------------------------------------------------------


def _z(row: dict) -> float:
    chance = 1.0 / row["k"]
    return min(max((row["accuracy"] - chance) / (1 - chance), 0.0), 1.0)


def _logistic(x: torch.Tensor, z: torch.Tensor, l2: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias minimising the binary cross-entropy of sigmoid(x w + b) against fractional z."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, z) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_predictor(rows: list[dict]) -> dict:
    """The logistic predictor with per-bin residual percentiles (tina/expected.py reads it)."""
    x = torch.tensor([[r["features"][f] for f in FEATURES] for r in rows], dtype=torch.float64)
    z = torch.tensor([_z(r) for r in rows], dtype=torch.float64)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    w, b = _logistic((x - mean) / scale, z)
    eta = ((x - mean) / scale) @ w + b
    zc = z.clamp(0.005, 0.995)
    resid = (torch.log(zc / (1 - zc)) - eta).numpy()
    key = np.array([r["features"][BIN_FEATURE] for r in rows])
    edges = np.unique(np.quantile(key, np.linspace(0, 1, N_BINS + 1)[1:-1])).tolist() + [math.inf]
    bins, lo = [], -math.inf
    for upto in edges:
        sel = (key > lo) & (key <= upto)
        r = resid[sel] if sel.sum() >= 5 else resid
        bins.append({"upto": float(upto) if upto < math.inf else 1e9, "low": float(np.quantile(r, COVERAGE[0])),
                     "high": float(np.quantile(r, COVERAGE[1])), "rows": int(sel.sum())})
        lo = upto
    return {"features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist(), "weights": w.tolist(),
            "bias": float(b), "bins": bins, "bin_feature": BIN_FEATURE, "coverage_percentiles": list(COVERAGE),
            "target": "z = (accuracy - 1/k) / (1 - 1/k), logistic"}


def _class_points(rows: list[dict]) -> list[dict]:
    """Every non-exactly named class of the degraded prompts, with whether it resolved to its true class."""
    return [m for r in rows if r["form"] != "names" for m in r["matches"]
            if m["name"].lower() != m["known"].lower()]


def fit_resolution(rows: list[dict]) -> dict | None:
    """Logistic P(resolves to the true class | similarity, margin) (tina/expected.py resolution_probability)."""
    pts = _class_points(rows)
    if len(pts) < 10 or len({m["resolved_true"] for m in pts}) < 2:
        return None
    x = torch.tensor([[m["similarity"], m["margin"]] for m in pts], dtype=torch.float64)
    w, b = _logistic(x, torch.tensor([float(m["resolved_true"]) for m in pts], dtype=torch.float64), l2=0.0)
    return {"weights": w.tolist(), "bias": float(b), "classes": len(pts)}


def fit_unknown_threshold(rows: list[dict]) -> dict:
    """Similarity at which a non-exactly named class resolves to its true class with probability 1/2."""
    pts = _class_points(rows)
    if len(pts) < 10 or len({m["resolved_true"] for m in pts}) < 2:
        return {"value": None, "classes": len(pts)}
    s = torch.tensor([m["similarity"] for m in pts], dtype=torch.float64)[:, None]
    y = torch.tensor([float(m["resolved_true"]) for m in pts], dtype=torch.float64)
    w, b = _logistic(s, y, l2=0.0)
    return {"value": float(-b / w[0]), "classes": len(pts), "resolved_true": int(y.sum()), "slope": float(w[0])}


def check(predictor: dict, rows: list[dict]) -> dict:
    """MAE and 80%-range coverage of the predictor on rows it was not fitted on, overall and per form."""
    from tina.expected import predict

    def stats(rs):
        err, inside = [], []
        for r in rs:
            e, lo, hi = predict(predictor, r["features"], r["k"])
            r["expected"], r["low"], r["high"] = e, lo, hi
            err.append(abs(e - r["accuracy"]))
            inside.append(lo <= r["accuracy"] <= hi)
        return {"rows": len(rs), "mae": float(np.mean(err)), "coverage": float(np.mean(inside)),
                "mean_accuracy": float(np.mean([r["accuracy"] for r in rs])),
                "mean_expected": float(np.mean([r["expected"] for r in rs]))}

    out = stats(rows)
    out["by_form"] = {f: stats([r for r in rows if r["form"] == f]) for f in dict.fromkeys(r["form"] for r in rows)}
    return out


# ---- the command ----------------------------------------------------------------------------------


def measure_all(cfg: CalibrationConfig) -> dict:
    """Generate and score every calibration model: pair recall, fit rows, check rows."""
    from tina.config import load_config
    from tina.training.datasets import load_dataset
    from tina.sample import Tina
    from zoo_builder.config import ZooConfig
    from zoo_builder.tasks import sample_tasks

    t0 = time.perf_counter()
    tina = Tina.from_pretrained(cfg.checkpoint)
    bundle = tina.bundle
    zoo = load_config(ZooConfig, cfg.zoo_config, [])
    if zoo.dataset.name != bundle.dataset:
        raise TinaError(f"the zoo config is for {zoo.dataset.name!r}, the checkpoint for {bundle.dataset!r}")
    ds = load_dataset(bundle.dataset)
    vocab_ids = {c: bundle.vocab.index(n) for c, n in enumerate(ds.classes) if n in bundle.vocab}  # dataset id -> vocab
    plan = sample_tasks(len(ds.classes), zoo.tasks)

    def split(name):
        ts = plan.split(name)
        return ts[: cfg.max_tasks] if cfg.max_tasks else ts

    bundle.quality = None  # the matches must not depend on an older calibration
    table = pair_recall(tina, ds, vocab_ids, cfg)
    log.info("pair recall measured (%.0f s)", time.perf_counter() - t0)
    fit_rows = measure(tina, ds, split("val"), "val", 0, cfg) + measure(tina, ds, split("unseen_class"), "unseen_class", 0, cfg)
    check_rows = measure(tina, ds, split("unseen_combo"), "unseen_combo", 1, cfg)
    if not fit_rows or not check_rows:
        raise TinaError("the zoo config has no val/unseen_class tasks to fit on or no unseen_combo tasks to check on")
    return {"format": QUALITY_FORMAT + "-rows", "vocab": bundle.vocab, "layout_fingerprint": bundle.fingerprint,
            "pair_recall": table, "fit_rows": fit_rows, "check_rows": check_rows,
            "measure_seconds": round(time.perf_counter() - t0, 1)}


def fit_all(m: dict, cfg: CalibrationConfig, dataset: str, name: str) -> dict:
    """quality.json's content from the measurements: predictor, thresholds, check."""
    resolution = fit_resolution(m["fit_rows"])
    for r in m["fit_rows"] + m["check_rows"]:
        r["features"] = task_features(_matches(r), m["pair_recall"], resolution)
    predictor = fit_predictor(m["fit_rows"]) | {"resolution": resolution}
    threshold = fit_unknown_threshold(m["fit_rows"])
    fit_stats, check_stats = check(predictor, m["fit_rows"]), check(predictor, m["check_rows"])
    names = check_stats["by_form"].get("names", {})
    table, V = m["pair_recall"], len(m["vocab"])
    return {
        "format": QUALITY_FORMAT, "vocab": m["vocab"], "layout_fingerprint": m["layout_fingerprint"], "dataset": dataset,
        "summary": (f"exact class names on {names.get('rows', 0)} held-out class sets: accuracy "
                    f"{names.get('mean_accuracy', float('nan')):.3f} (expected {names.get('mean_expected', float('nan')):.3f}, "
                    f"MAE {names.get('mae', float('nan')):.3f}); all prompt forms: MAE {check_stats['mae']:.3f}, "
                    f"80% range coverage {check_stats['coverage']:.0%}"),
        "pair_recall": table,
        "class_recall": {m["vocab"][v]: round(float(np.mean([x for x in table[v] if x is not None])), 4)
                         for v in range(V) if any(x is not None for x in table[v])},
        "predictor": predictor,
        "thresholds": {"unknown_similarity": threshold["value"] if threshold["value"] is not None else 0.5,
                       "unknown_fit": threshold, "near_chance": NEAR_CHANCE},
        "fit": {"splits": sorted({r["split"] for r in m["fit_rows"]}), "rows": len(m["fit_rows"]),
                "images": "even test positions", **{k: v for k, v in fit_stats.items() if k != "by_form"}},
        "check": {"split": "unseen_combo", "images": "odd test positions", **check_stats},
        "config": {"zoo_config": cfg.zoo_config, "images_per_class": cfg.images_per_class, "max_tasks": cfg.max_tasks,
                   "forms": list(cfg.forms), "seed": cfg.seed},
        "command": f"python -m evaluation.calibrate {name} --zoo-config {cfg.zoo_config} --images-per-class {cfg.images_per_class}"
                   + (f" --max-tasks {cfg.max_tasks}" if cfg.max_tasks else ""),
        "measure_seconds": m["measure_seconds"],
    }


def calibrate(cfg: CalibrationConfig, refit: bool = False) -> dict:
    """Measure (or, with `refit`, reread CHECKPOINT/quality_rows.json), fit, check; write quality.json
    (into the checkpoint, or cfg.out) and the measurements beside it; return quality.json's content."""
    from tina.atomic import atomic_write_text
    from tina.bundle import load_bundle
    from tina.registry import checkpoint_name, resolve_checkpoint

    path = resolve_checkpoint(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else path / QUALITY_FILE
    if refit:
        rows_file = out.parent / ROWS_FILE
        if not rows_file.is_file():
            raise TinaError(f"--refit needs {rows_file} from an earlier run")
        m = json.loads(rows_file.read_text())
        bundle = load_bundle(path)
        if m.get("vocab") != bundle.vocab or m.get("layout_fingerprint") != bundle.fingerprint:
            raise TinaError(f"{rows_file} was measured on another vocabulary or layout; calibrate without --refit")
        dataset = bundle.dataset
    else:
        m = measure_all(cfg)
        dataset = load_bundle(path).dataset
        atomic_write_text(out.parent / ROWS_FILE, json.dumps(m))  # before fitting: a failed fit keeps the measurements
    quality = fit_all(m, cfg, dataset, checkpoint_name(path))
    atomic_write_text(out, json.dumps(quality, indent=1))
    return quality


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a generator folder or a shipped name")
    ap.add_argument("--zoo-config", required=True, help="the zoo YAML the generator was trained on (its task plan)")
    ap.add_argument("--images-per-class", type=int, default=200)
    ap.add_argument("--max-tasks", type=int, default=0, help="tasks per split (0 = all)")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="where to write (default CHECKPOINT/quality.json)")
    ap.add_argument("--refit", action="store_true", help=f"refit from the {ROWS_FILE} of an earlier run (no generation)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        q = calibrate(CalibrationConfig(args.checkpoint, args.zoo_config, args.images_per_class, args.max_tasks,
                                        tuple(args.forms), args.seed, args.out), refit=args.refit)
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(q["summary"])
    for form, s in q["check"]["by_form"].items():
        print(f"  {form:14s} {s['rows']:4d} rows  accuracy {s['mean_accuracy']:.3f}  expected {s['mean_expected']:.3f}  "
              f"MAE {s['mae']:.3f}  coverage {s['coverage']:.0%}")
    print(f"unknown-class similarity threshold {q['thresholds']['unknown_similarity']:.3f}; "
          f"measuring took {q['measure_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
