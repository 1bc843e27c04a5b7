"""Scaling curves: generated accuracy vs zoo size and vs generator size.

    python -m benchmarks.scaling --quick                     reduced scale on a CPU (tiny zoo, built if missing; minutes)
    python -m benchmarks.scaling --zoo zoos/fashion_mnist --fractions 0.125 0.25 0.5 1 \\
        --sizes DiT-T DiT-S DiT-M DiT-B --base-size DiT-S --steps 4000 --task-steps 1000 --batch-size 64 --eval-tasks 200 --seeds 3
                                                             the full curves (a GPU: about 20 trainings' worth)

Zoo size: a generator of `base_size` is trained on the first fraction f of the zoo's training models (a
subset zoo: a copy of the manifest and new train shards holding those models; every other file is linked)
with the same step budget. Generator size: each size is trained on the whole zoo. Every generator follows the
shipped recipe (`make train`): `steps` of diffusion training, then `task_steps` more with the task loss
(tina/training/task_loss.py), warm-started from the first. Every generator is
evaluated by the evaluation package on the SAME held-out tasks of the full zoo (`split`, class-name prompts, `seeds`
seeds) beside the zoo's oracle and classifier selection. Outputs in OUT: scaling.json,
scaling_zoo_size.png, scaling_generator_size.png; trained runs are kept under OUT/runs and reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from benchmarks import print_table

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ScalingConfig:
    """What to train and how to score it."""

    zoo: Optional[str] = None  # None: zoos/fashion_mnist, or OUT/tiny_zoo (configs/zoo/tiny.yaml) with tiny_zoo
    out: str = "outputs/scaling"
    train_config: str = "configs/train/fashion_mnist.yaml"
    fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    sizes: list[str] = field(default_factory=lambda: ["DiT-T", "DiT-S", "DiT-M"])
    base_size: str = "DiT-S"  # generator size of the zoo-size curve
    steps: int = 4000  # diffusion training steps of every generator (the same budget for all)
    task_steps: int = 1000  # then this many steps with the task loss (0: diffusion only, the pre-session-10 recipe)
    task_weight: float = 3.0  # the second stage's task_loss.weight and learning rate, as in `make train`
    task_lr: float = 2e-4
    batch_size: int = 64
    eval_tasks: int = 100  # held-out tasks scored per generator
    seeds: int = 3
    sample_steps: Optional[int] = None  # sampling steps (None: the checkpoint's)
    split: str = "unseen_combo"
    threads: int = 0  # torch threads (0: leave torch's default)
    tiny_zoo: bool = False  # without `zoo`: build (once) and use the tiny test zoo instead of zoos/fashion_mnist
    train_overrides: list[str] = field(default_factory=list)  # extra key=value for tina train

    @classmethod
    def preset(cls, quick: bool, zoo: str | None = None) -> "ScalingConfig":
        if not quick:
            return cls(zoo=zoo)
        return cls(zoo=zoo, out="outputs/scaling_quick", fractions=[0.25, 0.5, 1.0], sizes=["DiT-T", "DiT-S"],
                   base_size="DiT-T", steps=60, task_steps=10, batch_size=16, eval_tasks=6, seeds=3, sample_steps=10, threads=1, tiny_zoo=True)


def subset_zoo(zoo: Path, n: int, out: Path) -> Path:
    """A zoo holding only the first n training models (new train shards; everything else linked)."""
    from tina.training.data import read_manifest
    from tina.training.shardio import file_sha256

    man = read_manifest(zoo)
    keep = man["splits"]["train"][:n]
    if (out / "manifest.json").is_file():  # reuse only a subset of this very zoo
        old = read_manifest(out)
        if old["splits"]["train"] == keep and old.get("subset_of", {}).get("config_hash") == man.get("config_hash") \
                and old["layout"] == man["layout"]:
            return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wanted = set(keep)
    shard = out / "train-000000.tar"
    with tarfile.open(shard, "w") as dst:
        for name in man["shards"]["train"]:
            with tarfile.open(zoo / name) as src:
                for member in src.getmembers():
                    if member.isfile() and member.name.split(".", 1)[0] in wanted:
                        dst.addfile(member, src.extractfile(member))
    for p in zoo.iterdir():  # other splits' shards, generic model, vocabulary: links to the originals
        if p.name != "manifest.json" and p.name not in man["shards"]["train"] and not p.name.startswith("."):
            (out / p.name).symlink_to(p.resolve())
    sub = dict(man)
    sub["splits"] = {**man["splits"], "train": keep}
    sub["shards"] = {**man["shards"], "train": [shard.name]}
    sub["counts"] = {**man.get("counts", {}), "train": len(keep)}
    sub["shard_sha256"] = {**man.get("shard_sha256", {}), shard.name: file_sha256(shard)}
    sub["subset_of"] = {"zoo": str(zoo), "train_models": len(keep), "config_hash": man.get("config_hash")}
    (out / "manifest.json").write_text(json.dumps(sub, indent=1))
    return out


def _same_vectors(layout_a: dict, layout_b: dict) -> bool:
    """Two layouts describe the same flat vectors (token size aside)."""
    return {**layout_a, "token_size": 0} == {**layout_b, "token_size": 0}


def _current(man: dict) -> bool:
    """The zoo was built for today's target architecture (targets change during development)."""
    from tina.layout import layout_for
    from tina.targets import ImageSpec

    now = layout_for(man["target"], ImageSpec.from_dict(man["dataset"]["image"]), man["token_size"]).to_dict()
    return _same_vectors(now, man["layout"])


def _tiny_zoo(out: Path) -> Path:
    from tina.training.data import read_manifest

    zoo = out / "tiny_zoo"
    if (zoo / "manifest.json").is_file() and not _current(read_manifest(zoo)):
        shutil.rmtree(zoo)  # built for an older architecture
    if not (zoo / "manifest.json").is_file():
        from zoo_builder.build import main as zoo_main  # benchmarks may use the builder; `tina` never does

        if zoo_main(["build", str(ROOT / "configs" / "zoo" / "tiny.yaml"), f"out={zoo}"]) != 0:
            raise RuntimeError("building the tiny zoo failed")
    return zoo


def train_one(cfg: ScalingConfig, zoo: Path, size: str, name: str) -> tuple[Path, Path, float]:
    """Train (or reuse) one generator by the shipped recipe (`make train`): `steps` of diffusion training, then
    (task_steps > 0) a second stage with the task loss, warm-started from the first. Returns the first and the
    last stage's bundles (the same without a second stage) and the training seconds of both (Lightning fit time)."""
    bundle, secs = _stage(cfg, zoo, size, name, cfg.steps, 0, 0.0, [])
    if not cfg.task_steps:
        return bundle, bundle, secs
    task, task_secs = _stage(cfg, zoo, size, f"{name}-task", cfg.task_steps, cfg.steps, cfg.task_weight, [
        f"init_from={bundle}", f"optim.lr={cfg.task_lr}", f"optim.warmup_steps={min(50, max(1, cfg.task_steps // 10))}"])
    return bundle, task, secs + task_secs


def _stage(cfg: ScalingConfig, zoo: Path, size: str, name: str, steps: int, steps_before: int, task_weight: float,
           extra: list[str]) -> tuple[Path, float]:
    """One `tina train` run (or a finished run of the same settings on the same vectors, reused)."""
    import yaml

    from tina.config import load_config
    from tina.training.data import read_manifest
    from tina.training.train import TrainConfig, train

    run = Path(cfg.out) / "runs" / name
    bundle = run / "bundle"
    if (bundle / "bundle.json").is_file():
        t = json.loads((bundle / "bundle.json").read_text()).get("training", {})
        saved = yaml.safe_load((bundle / "config.yaml").read_text()) if (bundle / "config.yaml").is_file() else {}
        man = read_manifest(zoo)
        if (t.get("steps") == steps and t.get("steps_before", 0) == steps_before and t.get("generator_size") == size
                and float((saved.get("task_loss") or {}).get("weight", 0.0)) == task_weight
                and t.get("zoo_config_hash") == man.get("config_hash")
                and _same_vectors(json.loads((bundle / "layout.json").read_text()), man["layout"])):
            return bundle, float(t.get("seconds", float("nan")))
    overrides = [f"zoo={zoo}", f"out={run}", f"generator.size={size}", f"trainer.max_steps={steps}",
                 f"trainer.batch_size={cfg.batch_size}", f"optim.warmup_steps={min(200, max(1, steps // 10))}",
                 "resume=false"]
    if steps < 1000:  # no intermediate validation or checkpoints in short runs
        overrides += [f"trainer.val_every={10 * steps}", f"trainer.ckpt_every={10 * steps}", "val.tasks=2",
                      "trainer.final_val_tasks=2", "diffusion.steps=5"]
    overrides.append(f"task_loss.weight={task_weight}")
    path = train(load_config(TrainConfig, ROOT / cfg.train_config, overrides + extra + list(cfg.train_overrides)))
    return path, float(json.loads((path / "bundle.json").read_text())["training"]["seconds"])  # fit time, as recorded


def score(cfg: ScalingConfig, bundle: Path, zoo: Path, name: str) -> dict:
    from evaluation import evaluate, load_eval_config

    overrides = [f"checkpoint={bundle}", f"zoo={zoo}", f"out={Path(cfg.out) / 'evals' / name}", f"splits=[{cfg.split}]",
                 "forms=[names]", "image_shots=[]", "baselines=[oracle,selection]", "finetune.tasks=0", "plots=false",
                 f"tasks={cfg.eval_tasks}", f"seeds={cfg.seeds}"]
    if cfg.sample_steps:
        overrides.append(f"steps={cfg.sample_steps}")
    r = evaluate(load_eval_config(None, overrides))
    s = r["splits"][cfg.split]
    g, h = s["generated"]["names"], s["headline"]
    return {"generated": g["mean"], "std_tasks": g["std_tasks"], "std_seeds": g["std_seeds"], "tasks": g["n_tasks"],
            "oracle": h.get("oracle"), "selection": h.get("selection"), "ratio_to_oracle": h.get("ratio_to_oracle"),
            "gain_captured": h.get("gain_captured")}


def run(cfg: ScalingConfig) -> dict:
    import torch

    from tina.training.data import read_manifest

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    zoo = Path(cfg.zoo) if cfg.zoo else (_tiny_zoo(out) if cfg.tiny_zoo else ROOT / "zoos" / "fashion_mnist")
    man = read_manifest(zoo)
    n_train = len(man["splits"]["train"])
    runs = []

    def add(curve: str, data: Path, size: str, name: str, fraction: float, n: int) -> None:
        first, last, secs = train_one(cfg, data, size, name)
        row = {"curve": curve, "name": name, "fraction": fraction, "train_models": n, "size": size,
               "train_seconds": round(secs, 1), **_params(last), **score(cfg, last, zoo, name)}
        if last != first:  # the first stage scored on the same tasks: what the task loss adds at this scale
            row["generated_diffusion_only"] = score(cfg, first, zoo, f"{name}-diffusion")["generated"]
        runs.append(row)
        log.info("%s: %s", name, row)

    for f in sorted(set(cfg.fractions)):
        n = max(2, round(f * n_train))
        add("zoo_size", zoo if n >= n_train else subset_zoo(zoo, n, out / "zoos" / f"train{n}"), cfg.base_size,
            f"zoo{n}-{cfg.base_size}", f, n)
    for size in cfg.sizes:
        add("generator_size", zoo, size, f"zoo{n_train}-{size}", 1.0, n_train)
    r = {"config": asdict(cfg), "zoo": str(zoo), "train_models": n_train, "steps": cfg.steps, "task_steps": cfg.task_steps, "runs": runs,
         "command_full": "python -m benchmarks.scaling --zoo zoos/fashion_mnist --fractions 0.125 0.25 0.5 1 --sizes DiT-T DiT-S "
                         "DiT-M DiT-B --base-size DiT-S --steps 4000 --task-steps 1000 --batch-size 64 --eval-tasks 200 --seeds 3"}
    r["plots"] = plot(r, out)
    (out / "scaling.json").write_text(json.dumps(r, indent=1))
    return r


def _params(bundle: Path) -> dict:
    meta = json.loads((bundle / "bundle.json").read_text())
    from tina.model import DiT, DiTConfig

    return {"generator_parameters": sum(p.numel() for p in DiT(DiTConfig(**meta["dit"])).parameters())}


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for curve, x_key, xlabel, fname in (("zoo_size", "train_models", "training models in the zoo", "scaling_zoo_size.png"),
                                         ("generator_size", "generator_parameters", "generator parameters", "scaling_generator_size.png")):
        rows = sorted([x for x in r["runs"] if x["curve"] == curve], key=lambda x: x[x_key])
        if not rows:
            continue
        xs = [x[x_key] for x in rows]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.errorbar(xs, [x["generated"] for x in rows], yerr=[x["std_seeds"] for x in rows], fmt="o-", capsize=3, label="generated")
        if all("generated_diffusion_only" in x for x in rows):
            ax.plot(xs, [x["generated_diffusion_only"] for x in rows], "s-", color="0.6", label="generated, diffusion stage only")
        for key, style in (("oracle", "g--"), ("selection", "r:")):
            ax.plot(xs, [x[key] for x in rows], style, label=key)
        for x in rows:
            ax.annotate(x["size"] if curve == "generator_size" else f"{x['fraction']:g}", (x[x_key], x["generated"]),
                        textcoords="offset points", xytext=(3, 5), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test accuracy ({r['config']['split']})")
        ax.set_title(f"{curve.replace('_', ' ')}: {r['steps']} + {r.get('task_steps', 0)} task-loss steps each", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    return written


def rows(r: dict) -> list[tuple[str, object]]:
    out = []
    for x in r["runs"]:
        out.append((f"{x['curve']}: {x['train_models']} models, {x['size']}",
                    f"gen {x['generated']:.3f} ± {x['std_seeds']:.3f} (diffusion only {x.get('generated_diffusion_only', float('nan')):.3f}) | oracle {x['oracle']:.3f} | selection {x['selection']:.3f} "
                    f"| {x['train_seconds']:.0f} s"))
    out.append(("plots", ", ".join(r["plots"])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="reduced scale on a CPU (the tiny zoo, 60 steps)")
    ap.add_argument("--zoo")
    ap.add_argument("--out")
    ap.add_argument("--fractions", nargs="+", type=float)
    ap.add_argument("--sizes", nargs="+")
    ap.add_argument("--base-size")
    ap.add_argument("--steps", type=int, help="diffusion training steps per generator")
    ap.add_argument("--task-steps", type=int, help="then this many steps with the task loss (0: none)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--eval-tasks", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = ScalingConfig.preset(args.quick, args.zoo)
    for key in ("out", "fractions", "sizes", "base_size", "steps", "task_steps", "batch_size", "eval_tasks", "seeds", "threads"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    r = run(cfg)
    print_table("scaling", rows(r))
    print(f"results: {Path(cfg.out) / 'scaling.json'}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
