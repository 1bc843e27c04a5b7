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
     accuracy. The fit (evaluation/calibration_fit.py): P(a class resolves to its true class), the
     logistic predictor of z = (accuracy - chance) / (1 - chance), its 80% range, the thresholds.
  3. held-out generator rows (--extra-rows FILE): a generator whose zoo held classes out of everything
     (e.g. configs/zoo/fashion_mnist_heldout.yaml) meets truly unknown class names on its unseen_class
     sets. Calibrate it first (its quality_rows.json), then pass that file: its unseen_class rows, each
     scored with its own pair_recall, split by task in two halves: one joins the fit, the other is
     checked on its own ("check_unknown"). They are copied into this checkpoint's quality_rows.json.
  4. check: the unseen_combo class sets (never used for fitting), same forms: MAE and range coverage.
The measurements go to CHECKPOINT/quality_rows.json; `--refit` refits from them without generating.
Test images of each class are split in two halves (even / odd positions): pair_recall and the fit
use the first half, the check the second, so the check never sees a fitted image.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tina.errors import TinaError
from evaluation.calibration_fit import check, fit_near_chance, fit_predictor, fit_resolution, fit_unknown_threshold
from tina.expected import QUALITY_FILE, QUALITY_FORMAT, ClassMatch, task_features

log = logging.getLogger(__name__)
ROWS_FILE = "quality_rows.json"  # the measurements behind quality.json (refit with --refit, no generation)
FORMS = ("names", "related", "paraphrase", "one_unrelated", "unrelated")
ROWS_FORMAT = "tina-quality/1-rows"  # the measurements (unchanged by quality.json format 2)
HELDOUT_SPLIT = "unseen_class"  # the split of a held-out generator's rows whose classes it never saw


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
    extra_rows: tuple[str, ...] = ()  # quality_rows.json files of held-out generators (their unseen_class rows join the fit)


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
    return {"format": ROWS_FORMAT, "vocab": bundle.vocab, "layout_fingerprint": bundle.fingerprint,
            "dataset": bundle.dataset, "text_encoder": bundle.text_encoder,
            "pair_recall": table, "fit_rows": fit_rows, "check_rows": check_rows,
            "measure_seconds": round(time.perf_counter() - t0, 1)}


def read_extra_rows(path: str | Path, text_encoder: str) -> dict:
    """A held-out generator's measurements (its quality_rows.json): its unseen_class rows and pair_recall."""
    path = Path(path)
    try:
        e = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TinaError(f"--extra-rows {path}: unreadable ({err})") from None
    if not isinstance(e, dict) or e.get("format") != ROWS_FORMAT:
        raise TinaError(f"--extra-rows {path}: not a {ROWS_FILE} written by python -m evaluation.calibrate")
    if e.get("text_encoder") != text_encoder:
        raise TinaError(f"--extra-rows {path}: measured with text encoder {e.get('text_encoder')!r}, this checkpoint uses "
                        f"{text_encoder!r} (similarities would not be comparable)")
    rows = [r for r in e["fit_rows"] if r["split"] == HELDOUT_SPLIT]
    if not rows:
        raise TinaError(f"--extra-rows {path}: no {HELDOUT_SPLIT} rows (calibrate a generator whose zoo held classes out)")
    return {"source": str(path), "dataset": e.get("dataset"), "vocab": e["vocab"], "pair_recall": e["pair_recall"], "rows": rows}


def _extra_halves(m: dict, resolution=None) -> tuple[list[dict], list[dict]]:
    """The held-out generators' rows, featured with their own pair_recall, split by task: (fit half, check half)."""
    fit, chk = [], []
    for e in m.get("extra", []):
        tasks = sorted({r["task"] for r in e["rows"]})
        half = {t: i % 2 for i, t in enumerate(tasks)}
        for r in e["rows"]:
            r["split"] = f"heldout:{HELDOUT_SPLIT}"
            if resolution is not False:
                r["features"] = task_features(_matches(r), e["pair_recall"], resolution)
            (fit if half[r["task"]] == 0 else chk).append(r)
    return fit, chk


def fit_all(m: dict, cfg: CalibrationConfig, dataset: str, name: str) -> dict:
    """quality.json's content from the measurements: predictor, thresholds, check."""
    extra_fit, extra_check = _extra_halves(m, resolution=False)
    fit_rows = m["fit_rows"] + extra_fit
    resolution = fit_resolution(fit_rows)
    for r in m["fit_rows"] + m["check_rows"]:
        r["features"] = task_features(_matches(r), m["pair_recall"], resolution)
    extra_fit, extra_check = _extra_halves(m, resolution)
    fit_rows = m["fit_rows"] + extra_fit
    predictor = fit_predictor(fit_rows) | {"resolution": resolution}
    threshold = fit_unknown_threshold(fit_rows)
    near = fit_near_chance(predictor, fit_rows)
    fit_stats = check(predictor, fit_rows)
    check_stats = check(predictor, m["check_rows"], near["value"])
    names = check_stats["by_form"].get("names", {})
    table, V = m["pair_recall"], len(m["vocab"])
    summary = (f"exact class names on {names.get('rows', 0)} held-out class sets: accuracy "
               f"{names.get('mean_accuracy', float('nan')):.3f} (expected {names.get('mean_expected', float('nan')):.3f}, "
               f"MAE {names.get('mae', float('nan')):.3f}); all prompt forms: MAE {check_stats['mae']:.3f}, "
               f"80% range coverage {check_stats['coverage']:.0%}")
    q = {
        "format": QUALITY_FORMAT, "vocab": m["vocab"], "layout_fingerprint": m["layout_fingerprint"], "dataset": dataset,
        "summary": summary,
        "pair_recall": table,
        "class_recall": {m["vocab"][v]: round(float(np.mean([x for x in table[v] if x is not None])), 4)
                         for v in range(V) if any(x is not None for x in table[v])},
        "predictor": predictor,
        "thresholds": {"unknown_similarity": threshold["value"] if threshold["value"] is not None else 0.5,
                       "unknown_fit": threshold, "near_chance": near["value"], "near_chance_fit": near},
        "fit": {"splits": sorted({r["split"] for r in fit_rows}), "rows": len(fit_rows),
                "extra": [{"source": e["source"], "dataset": e["dataset"], "rows": len(e["rows"])} for e in m.get("extra", [])],
                "images": "even test positions", **{k: v for k, v in fit_stats.items() if k != "by_form"}},
        "check": {"split": "unseen_combo", "images": "odd test positions", **check_stats},
        "config": {"zoo_config": cfg.zoo_config, "images_per_class": cfg.images_per_class, "max_tasks": cfg.max_tasks,
                   "forms": list(cfg.forms), "seed": cfg.seed},
        "command": f"python -m evaluation.calibrate {name} --zoo-config {cfg.zoo_config} --images-per-class {cfg.images_per_class}"
                   + (f" --max-tasks {cfg.max_tasks}" if cfg.max_tasks else "")
                   + "".join(f" --extra-rows {e['source']}" for e in m.get("extra", [])),
        "measure_seconds": m["measure_seconds"],
    }
    if extra_check:  # the other half of the held-out generators' unknown-class sets: never fitted on
        q["check_unknown"] = {"split": f"heldout:{HELDOUT_SPLIT}", "sources": [e["source"] for e in m["extra"]],
                              **check(predictor, extra_check, near["value"])}
        u = q["check_unknown"]
        q["summary"] += f"; truly unknown classes ({u['rows']} rows of a held-out generator): MAE {u['mae']:.3f}, coverage {u['coverage']:.0%}"
    return q


def calibrate(cfg: CalibrationConfig, refit: bool = False) -> dict:
    """Measure (or, with `refit`, reread CHECKPOINT/quality_rows.json), add cfg.extra_rows, fit, check;
    write quality.json (into the checkpoint, or cfg.out) and the measurements beside it; return
    quality.json's content."""
    from tina.atomic import atomic_write_text
    from tina.bundle import load_bundle
    from tina.registry import checkpoint_name, resolve_checkpoint

    path = resolve_checkpoint(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else path / QUALITY_FILE
    bundle = load_bundle(path)
    extra = [read_extra_rows(p, bundle.text_encoder) for p in cfg.extra_rows]  # checked before any long measurement
    if refit:
        rows_file = out.parent / ROWS_FILE
        if not rows_file.is_file():
            raise TinaError(f"--refit needs {rows_file} from an earlier run")
        m = json.loads(rows_file.read_text())
        if m.get("vocab") != bundle.vocab or m.get("layout_fingerprint") != bundle.fingerprint:
            raise TinaError(f"{rows_file} was measured on another vocabulary or layout; calibrate without --refit")
    else:
        m = measure_all(cfg)
    if extra:
        m["extra"] = extra  # kept with the measurements, so that a later --refit needs no other file
    if extra or not refit:
        atomic_write_text(out.parent / ROWS_FILE, json.dumps(m))  # before fitting: a failed fit keeps the measurements
    quality = fit_all(m, cfg, bundle.dataset, checkpoint_name(path))
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
    ap.add_argument("--extra-rows", nargs="+", default=[], metavar="ROWS_JSON",
                    help=f"the {ROWS_FILE} of a generator trained with classes held out: its unknown-class rows join the fit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        q = calibrate(CalibrationConfig(args.checkpoint, args.zoo_config, args.images_per_class, args.max_tasks,
                                        tuple(args.forms), args.seed, args.out, extra_rows=tuple(args.extra_rows)),
                      refit=args.refit)
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(q["summary"])
    for form, s in q["check"]["by_form"].items():
        print(f"  {form:14s} {s['rows']:4d} rows  accuracy {s['mean_accuracy']:.3f}  expected {s['mean_expected']:.3f}  "
              f"MAE {s['mae']:.3f}  coverage {s['coverage']:.0%}")
    for form, s in q.get("check_unknown", {}).get("by_form", {}).items():
        print(f"  unknown/{form:10s} {s['rows']:4d} rows  accuracy {s['mean_accuracy']:.3f}  expected {s['mean_expected']:.3f}  "
              f"MAE {s['mae']:.3f}  coverage {s['coverage']:.0%}")
    t = q["thresholds"]
    print(f"unknown-class similarity threshold {t['unknown_similarity']:.3f}; near-chance warning under expected z "
          f"{t['near_chance']:.3f}; measuring took {q['measure_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
