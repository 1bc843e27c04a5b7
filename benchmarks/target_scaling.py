"""Target scaling: how generation quality and cost change with the number of generated parameters.

    python -m benchmarks.target_scaling --quick              seconds-to-minutes: the tiny zoo recipe, 30 steps
    python -m benchmarks.target_scaling                      the committed comparison (docs/results/target_scaling.*)
    python -m benchmarks.target_scaling --stages latency     re-measure only the generation latency (reuses the rest)

For each target (default cnn-5k and cnn-33k, both whole-network: every parameter is generated) the SAME recipe
runs with only `target=` changed: a zoo from `zoo_config` + `zoo_overrides` (same tasks, same seeds, same
fine-tuning budget), a generator of `size` trained for `steps` steps of `batch_size` models, then `tina eval` on
the zoo's unseen_combo split (class-name prompts, `seeds` seeds) beside the oracle (the zoo's fine-tuned model),
classifier selection and retrieval, with paired bootstrap intervals. Cost: wall and CPU seconds of the zoo build
and of training (CPU seconds = user + system of this process, less sensitive to a shared machine than wall time),
and the warm prompt -> model latency of a k=10 model (median of `latency_runs`).

Every stage writes its record under OUT/<target>/ and is skipped when that record matches the settings, so an
interrupted run resumes and `--stages latency` re-times generation alone (e.g. under a quiet machine). The
assembled results go to `json_out` and `md_out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
STAGES = ("zoo", "train", "eval", "latency")
BASELINES = ("oracle", "selection", "retrieval")
# The committed run's zoo recipe: a small cut of configs/zoo/fashion_mnist.yaml that fit in an hour of a 2-core CPU
# shared with another job (a cnn-33k model costs ~5x a cnn-5k one to fine-tune). The generic model sees 1,000
# images a class for one epoch, so fine-tuning has a gain worth generating (+6-8 points over selection).
FULL_ZOO_OVERRIDES = ["tasks.train=120", "tasks.val=8", "tasks.unseen_combo=32", "finetune.steps=100",
                      "finetune.eval_per_class=100", "generic.images_per_class=1000", "shard_size=40", "runtime.workers=1"]
# runtime.workers=1 (not part of a zoo's identity): the generic trainer (zoo_builder/stack.py) shares one template
# module per k between worker threads, and torch.func.functional_call swaps parameters into it, so two groups
# fitted at once on a CPU can see each other's tensors (cnn-33k: "Given groups=12, expected weight to be divisible
# by 12"); one worker with two threads avoids it.
QUICK_ZOO_OVERRIDES = ["tasks.unseen_class=0", "tasks.held_out_classes=0", "tasks.val=4", "tasks.unseen_combo=6",
                       "runtime.workers=1"]


@dataclass
class TargetScalingConfig:
    """What to build, train and score for each target; everything but `targets` is shared by all of them."""

    targets: list[str] = field(default_factory=lambda: ["cnn-5k", "cnn-33k"])
    out: str = "outputs/target_scaling"  # zoos, runs, evals and per-stage records
    zoo_config: str = "configs/zoo/fashion_mnist.yaml"
    zoo_overrides: list[str] = field(default_factory=lambda: list(FULL_ZOO_OVERRIDES))
    train_config: str = "configs/train/fashion_mnist.yaml"
    size: str = "DiT-T"  # generator size
    steps: int = 400  # generator training steps (the same budget for every target)
    batch_size: int = 16  # zoo models per training step
    eval_tasks: int = 32  # unseen_combo tasks scored (the first ones)
    seeds: int = 1  # generation seeds per task
    images_per_class: int = 100  # test images per class and task
    latency_runs: int = 20  # warm k=10 generations timed (median reported)
    threads: int = 0  # torch threads (0: torch's default)
    json_out: str = "docs/results/target_scaling.json"
    md_out: str = "docs/results/target_scaling.md"

    def __post_init__(self):
        if not self.targets:
            raise ValueError("targets must name at least one target")
        if min(self.steps, self.batch_size, self.eval_tasks, self.seeds, self.latency_runs) < 1:
            raise ValueError("steps, batch_size, eval_tasks, seeds and latency_runs must be >= 1")

    @classmethod
    def preset(cls, quick: bool) -> "TargetScalingConfig":
        if not quick:
            return cls()
        return cls(out="outputs/target_scaling_quick", zoo_config="configs/zoo/tiny.yaml",
                   zoo_overrides=list(QUICK_ZOO_OVERRIDES), steps=30, batch_size=8, eval_tasks=4, images_per_class=20,
                   latency_runs=3, threads=1, json_out="outputs/target_scaling_quick/target_scaling.json",
                   md_out="outputs/target_scaling_quick/target_scaling.md")


# ---- measuring ----------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(fn: Callable[[], dict]) -> dict:
    """fn's record plus its wall and CPU seconds (user + system of every thread of this process)."""
    w0, c0 = time.perf_counter(), _cpu_seconds()
    rec = fn()
    return {**rec, "wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(_cpu_seconds() - c0, 1),
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def _cached(path: Path, key: dict) -> dict | None:
    """A stage's stored record when it was made with these settings (`key`)."""
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("key") == key:
            return rec
    return None


def _store(path: Path, key: dict, rec: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"key": key, **rec}
    path.write_text(json.dumps(rec, indent=1))
    return rec


# ---- stages -------------------------------------------------------------------------------------------


def zoo_stage(cfg: TargetScalingConfig, target: str, base: Path) -> dict:
    from tina.config import load_config
    from zoo_builder.build import build
    from zoo_builder.config import ZooConfig, identity_hash

    zcfg = load_config(ZooConfig, ROOT / cfg.zoo_config, [*cfg.zoo_overrides, f"target={target}", f"out={base / 'zoo'}"])
    key = {"identity_hash": identity_hash(zcfg)}
    rec = _cached(base / "zoo.json", key)
    if rec is not None:
        return rec
    man = measured(lambda: {"manifest": build(zcfg)})
    m = man.pop("manifest")
    generic = json.loads((base / "zoo" / "generic.json").read_text()) if (base / "zoo" / "generic.json").is_file() else {}
    return _store(base / "zoo.json", key, {**man, "models": m["counts"]["models"], "counts": m["counts"],
                                           "metrics": m["metrics"], "generic": generic,
                                           "overrides": [*cfg.zoo_overrides, f"target={target}"]})


def train_stage(cfg: TargetScalingConfig, target: str, base: Path, zoo_key: dict) -> dict:
    from tina.config import load_config
    from tina.training.train import TrainConfig, train

    key = {"zoo": zoo_key, "size": cfg.size, "steps": cfg.steps, "batch_size": cfg.batch_size, "config": cfg.train_config}
    rec = _cached(base / "train.json", key)
    if rec is not None and (Path(rec["bundle"]) / "bundle.json").is_file():
        return rec
    overrides = [f"zoo={base / 'zoo'}", f"out={base / 'run'}", f"generator.size={cfg.size}", f"trainer.max_steps={cfg.steps}",
                 f"trainer.batch_size={cfg.batch_size}", f"optim.warmup_steps={min(200, max(1, cfg.steps // 10))}",
                 "resume=false", f"trainer.val_every={10 * cfg.steps}", f"trainer.ckpt_every={10 * cfg.steps}",
                 "val.tasks=2", "trainer.final_val_tasks=2"]  # scoring is eval's job: no intermediate validation
    tcfg = load_config(TrainConfig, ROOT / cfg.train_config, overrides)
    rec = measured(lambda: {"bundle": str(train(tcfg))})
    meta = json.loads((Path(rec["bundle"]) / "bundle.json").read_text())
    from tina.model import DiT, DiTConfig

    rec["fit_s"] = meta.get("training", {}).get("seconds")  # Lightning's own fit time, as the bundle records it
    rec["generator_parameters"] = sum(p.numel() for p in DiT(DiTConfig(**meta["dit"])).parameters())
    rec["overrides"] = overrides
    return _store(base / "train.json", key, rec)


def eval_stage(cfg: TargetScalingConfig, base: Path, bundle: str, train_key: dict) -> dict:
    from evaluation import evaluate, load_eval_config

    key = {"train": train_key, "tasks": cfg.eval_tasks, "seeds": cfg.seeds, "images_per_class": cfg.images_per_class}
    rec = _cached(base / "eval.json", key)
    if rec is not None:
        return rec
    overrides = [f"checkpoint={bundle}", f"zoo={base / 'zoo'}", f"out={base / 'eval'}", "splits=[unseen_combo]",
                 "forms=[names]", "image_shots=[]", f"baselines=[{','.join(BASELINES)}]", "finetune.tasks=0",
                 "novelty.tasks=0", "diversity.tasks=0", "plots=false", f"tasks={cfg.eval_tasks}", f"seeds={cfg.seeds}",
                 f"images_per_class={cfg.images_per_class}"]
    rec = measured(lambda: {"split": evaluate(load_eval_config(None, overrides))["splits"]["unseen_combo"]})
    return _store(base / "eval.json", key, {**rec, "overrides": overrides})


def latency_stage(cfg: TargetScalingConfig, base: Path, bundle: str, train_key: dict) -> dict:
    """Warm prompt -> model latency (in memory) for one k=10 model, and batched models/s."""
    import torch

    from benchmarks import median
    from tina.sample import Tina

    key = {"train": train_key, "runs": cfg.latency_runs, "threads": torch.get_num_threads()}
    tina = Tina.from_pretrained(bundle)
    classes = list(json.loads((base / "zoo" / "manifest.json").read_text())["dataset"]["classes"])[: min(10, tina.bundle.k_max)]
    tina.generate(classes=classes, seed=0)  # first call: lazy imports and the text encoder, not counted
    times = []
    for seed in range(1, cfg.latency_runs + 1):
        t0 = time.perf_counter()
        tina.generate(classes=classes, seed=seed)
        times.append(time.perf_counter() - t0)
    n = 32
    t0 = time.perf_counter()
    tina.generate_many([classes] * n, seed=0)
    batched = time.perf_counter() - t0
    return _store(base / "latency.json", key, {"k": len(classes), "median_s": round(median(times), 4),
                                               "min_s": round(min(times), 4), "batched_models": n,
                                               "batched_models_per_s": round(n / batched, 2),
                                               "load_average_end": [round(x, 2) for x in os.getloadavg()]})


def layout_counts(bundle: str, k: int = 10) -> dict:
    """Generated parameters and tokens of a k-class model, read off the bundle's layout."""
    from tina.layout import ParamLayout

    lay = ParamLayout.from_dict(json.loads((Path(bundle) / "layout.json").read_text()))
    return {"params_k10": lay.num_params(k), "tokens_k10": lay.num_tokens(k), "token_size": lay.token_size,
            "body_params": lay.body_size, "head_row": lay.head_dim, "body_tokens": lay.n_body_tokens,
            "tokens_per_class": lay.tokens_per_class, "frozen": len(lay.frozen)}


# ---- assembling -----------------------------------------------------------------------------------------


def row(target: str, zoo: dict, train: dict, ev: dict, latency: dict | None, counts: dict) -> dict:
    """One target's line of the comparison from its stage records (pure: tested with fake records)."""
    s = ev["split"]
    h = s["headline"]
    base = s["baselines"]
    diffs = {name: {k: d[k] for k in ("diff", "lo", "hi", "excludes_zero")} for name, d in h.get("differences", {}).items()}
    lat = None
    if latency:
        lat = {"median_s": latency["median_s"], "params_per_s": round(counts["params_k10"] / latency["median_s"]),
               "batched_models_per_s": latency["batched_models_per_s"]}
    return {
        "target": target, **counts,
        "zoo": {"models": zoo["models"], "wall_s": zoo["wall_s"], "cpu_s": zoo["cpu_s"],
                "generic_test_acc": zoo.get("generic", {}).get("test_acc"), "generic_s": zoo.get("generic", {}).get("seconds"),
                "metrics": zoo.get("metrics")},  # the builder's own oracle / selection accuracy per split
        "train": {"steps": train["key"]["steps"], "batch_size": train["key"]["batch_size"], "size": train["key"]["size"],
                  "generator_parameters": train["generator_parameters"], "wall_s": train["wall_s"], "cpu_s": train["cpu_s"],
                  "fit_s": train.get("fit_s")},
        # 1-, 5- and 15-minute load averages when each stage ended: how shared the CPU was while it was timed
        "load_average_end": {"zoo": zoo.get("load_average_end"), "train": train.get("load_average_end")},
        "eval": {"tasks": s["tasks"], "wall_s": ev["wall_s"], "generated": h["generated"],
                 **{b: base[b]["mean"] for b in BASELINES if b in base},
                 "ratio_to_oracle": h.get("ratio_to_oracle"), "gain_captured": h.get("gain_captured"), "differences": diffs},
        "latency": lat,
    }


def comparisons(r: dict) -> list[dict]:
    """Each paired difference a - b of a target's row with its winner by the 95% interval (None: a tie)."""
    out = []
    for name, d in r["eval"]["differences"].items():
        a, b = (x.strip() for x in name.split(" - "))
        winner = None if not d["excludes_zero"] else (a if d["diff"] > 0 else b)
        out.append({"a": a, "b": b, **d, "winner": winner, "loser": None if winner is None else (b if winner == a else a)})
    return out


def verdict(r: dict) -> list[str]:
    """Plain sentences: which method wins on this target, by the paired 95% intervals (ties said as ties)."""
    out = []
    for c in comparisons(r):
        span = f"{c['a']} − {c['b']} {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
        out.append(f"{c['a']} vs {c['b']}: a tie ({span})" if c["winner"] is None else f"{c['winner']} beats {c['loser']} ({span})")
    return out


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    rows = res["rows"]
    c = res["config"]
    lines = ["# Target scaling: cnn-5k vs cnn-33k at one budget", "",
             f"Fashion-MNIST, the same zoo recipe for every target (`{c['zoo_config']}` with "
             f"`{' '.join(c['zoo_overrides'])}`), a {c['size']} generator trained {c['steps']} steps of {c['batch_size']} "
             f"models, scored on the first {c['eval_tasks']} unseen-combination tasks ({c['seeds']} seed, "
             f"{c['images_per_class']} test images a class). Machine: {res['machine']}.", "",
             "| target | generated params (k=10) | tokens (k=10) | zoo build s (wall / CPU) | train s (wall / CPU) "
             "| k=10 generation s (params/s) | generated | oracle | selection | retrieval | generated / oracle | gain captured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, lat = r["eval"], r["latency"]
        gen_cost = f"{lat['median_s']:.4f} ({lat['params_per_s']:,})" if lat else "–"
        lines.append(f"| {r['target']} | {r['params_k10']:,} | {r['tokens_k10']} | {r['zoo']['wall_s']:.0f} / {r['zoo']['cpu_s']:.0f} "
                     f"| {r['train']['wall_s']:.0f} / {r['train']['cpu_s']:.0f} | {gen_cost} | **{_f(e['generated'])}** "
                     f"| {_f(e.get('oracle'))} | {_f(e.get('selection'))} | {_f(e.get('retrieval'))} "
                     f"| {_f(e.get('ratio_to_oracle'))} | {_f(e.get('gain_captured'), 2)} |")
    lines += ["", "Paired bootstrap 95% intervals (tasks resampled, both methods on the same images):", ""]
    for r in rows:
        lines.append(f"- **{r['target']}**: " + "; ".join(verdict(r)) + ".")
    lines += ["", "Load average (1/5/15 min) when each stage ended, on 2 CPUs: "
              + "; ".join(f"{r['target']} zoo {r['load_average_end']['zoo']}, train {r['load_average_end']['train']}" for r in rows)
              + ". Wall times are only comparable between stages run on an equally quiet machine; CPU seconds "
              "(user + system, all threads) less so affected.", ""]
    lines += ["## What it says", ""] + [f"- {s}" for s in res["summary"]]
    lines += ["", "## Reproduce", "", "```bash", res["command"], "```", "",
              "Zoos, generators and evaluations land in "
              f"`{c['out']}/<target>/`; each stage is skipped when its record matches the settings.", ""]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """Comparative sentences across targets (pure)."""
    out = []
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        out.append(f"{b['target']} generates {b['params_k10'] / a['params_k10']:.1f}x the parameters of {a['target']} in "
                   f"{b['tokens_k10'] / a['tokens_k10']:.1f}x the tokens; its zoo cost {b['zoo']['cpu_s'] / max(a['zoo']['cpu_s'], 1e-9):.1f}x "
                   f"the CPU seconds and its generator {b['train']['cpu_s'] / max(a['train']['cpu_s'], 1e-9):.1f}x, at the same step budget.")
        for key, label in (("oracle", "oracle (fine-tuned) accuracy"), ("generated", "generated accuracy")):
            if a["eval"].get(key) is not None and b["eval"].get(key) is not None:
                out.append(f"{label}: {a['target']} {a['eval'][key]:.3f}, {b['target']} {b['eval'][key]:.3f} "
                           f"({b['eval'][key] - a['eval'][key]:+.3f}).")
        if a["latency"] and b["latency"]:
            out.append(f"k=10 generation: {a['latency']['median_s'] * 1e3:.1f} ms vs {b['latency']['median_s'] * 1e3:.1f} ms.")
    for r in rows:  # the oracle is the ceiling, not a baseline: only the others count as beating the generator
        beaten = [c["winner"] for c in comparisons(r) if c["loser"] == "generated" and c["winner"] != "oracle"]
        if beaten:
            out.append(f"On {r['target']} a baseline beats the generator: {', '.join(beaten)} (paired 95% interval below zero).")
    return out


def assemble(cfg: TargetScalingConfig, records: dict[str, dict], command: str, machine: str) -> dict:
    rows = [row(t, **records[t]) for t in cfg.targets]
    return {"format": "tina-target-scaling/1", "config": asdict(cfg), "command": command, "machine": machine,
            "rows": rows, "summary": summary(rows)}


# ---- driver ----------------------------------------------------------------------------------------------


def run(cfg: TargetScalingConfig, stages: tuple[str, ...] = STAGES, command: str = "", write: bool = True) -> dict | None:
    """Run (or reuse) every stage for every target; assemble the results when all are there and (`write`)
    write them to json_out and md_out."""
    import platform

    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records = {}
    for target in cfg.targets:
        base = Path(cfg.out) / target
        log.info("%s: zoo", target)
        zoo = zoo_stage(cfg, target, base) if "zoo" in stages else _need(base / "zoo.json")
        if zoo is None:
            continue
        log.info("%s: zoo %s models, %.0f s; training", target, zoo["models"], zoo["wall_s"])
        train = train_stage(cfg, target, base, zoo["key"]) if "train" in stages else _need(base / "train.json")
        if train is None:
            continue
        log.info("%s: trained in %.0f s; evaluating", target, train["wall_s"])
        ev = eval_stage(cfg, base, train["bundle"], train["key"]) if "eval" in stages else _need(base / "eval.json")
        lat = latency_stage(cfg, base, train["bundle"], train["key"]) if "latency" in stages else _need(base / "latency.json")
        if ev is None:
            continue
        records[target] = {"zoo": zoo, "train": train, "ev": ev, "latency": lat, "counts": layout_counts(train["bundle"])}
        log.info("%s: generated %.4f", target, ev["split"]["headline"]["generated"])
    if set(records) != set(cfg.targets):
        log.warning("results not written: missing %s", sorted(set(cfg.targets) - set(records)))
        return None
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    res = assemble(cfg, records, command, machine)
    for path, text in ((cfg.json_out, json.dumps(res, indent=1)), (cfg.md_out, markdown(res))) if write else ():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return res


def _need(path: Path) -> dict | None:
    if not path.is_file():
        log.warning("%s is missing (run its stage first)", path)
        return None
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.target_scaling", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="the tiny zoo recipe and 30 training steps (a smoke run)")
    ap.add_argument("--targets", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--size")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--eval-tasks", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES),
                    help="stages to run; the others are read from their records (none: only re-assemble the results)")
    ap.add_argument("--no-write", action="store_true", help="do not write json_out / md_out (e.g. one target of several)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = TargetScalingConfig.preset(args.quick)
    for key in ("targets", "out", "size", "steps", "batch_size", "eval_tasks", "threads"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    cfg.__post_init__()
    command = "python -m benchmarks.target_scaling" + (" --quick" if args.quick else "")
    res = run(cfg, tuple(args.stages), command, write=not args.no_write)
    if res is None:
        return 1
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
