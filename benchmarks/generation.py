"""Prompt → model latency, beside the time fine-tuning needs to reach the same accuracy.

    python -m benchmarks.generation [--quick] [--checkpoint B] [--zoo Z] [--prompt "classify X vs Y"]

  warm    Tina already loaded in this process: `Tina.generate(prompt)` until the model is in memory
          (median of >= 5 runs, each with another seed); also batched throughput (models/s).
  cold    `python -m tina.cli generate` as a fresh subprocess: process start → model folder written
          (median of >= 3 runs); the child's peak memory from getrusage(RUSAGE_CHILDREN).
  fine-tune  the same task's generated model is scored on real test images; then the zoo builder's recipe
          (evaluation.finetune.finetune_curve: Adam, the zoo's lr schedule and batch, from classifier selection) is timed
          for growing budgets until one reaches that accuracy (at most the zoo's own steps, the oracle's
          budget). Needs the zoo (from --zoo or the checkpoint's training record).
Goals (2-core CPU): warm <= 1 s, cold <= 5 s. Without a trained checkpoint an untrained random generator
of the default size stands in (latency does not depend on training; the fine-tune comparison is skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import cuda_peak_mb, median, peak_rss_mb, print_table

log = logging.getLogger(__name__)
GOALS = {"warm_s": 1.0, "cold_s": 5.0}


def _checkpoint(checkpoint: str | None, tmp: Path, notes: list[str]) -> str:
    from tina.errors import TinaError
    from tina.registry import resolve_checkpoint

    try:
        return str(resolve_checkpoint(checkpoint or "default"))
    except TinaError:
        if checkpoint:
            raise
    from tina.training.testing import random_bundle

    from tina.diffusion import DiffusionConfig

    notes.append("no trained 'default' checkpoint here: an untrained DiT-S generator stands in (latency only)")
    path = random_bundle(tmp / "random", size="DiT-S")
    meta = json.loads((path / "bundle.json").read_text())  # sample like a trained default: its step count
    meta["sampling"] = {"sampler": "ddim", "steps": DiffusionConfig().steps, "guidance": 1.0}
    (path / "bundle.json").write_text(json.dumps(meta, indent=2))
    return str(path)


def _zoo_task(zoo: str | None, bundle) -> tuple[str | None, dict | None]:
    """The zoo (argument or the checkpoint's training record) and its first held-out task."""
    from tina.training.data import load_split

    zoo = zoo or bundle.meta.get("training", {}).get("zoo")
    if not zoo or not (Path(zoo) / "manifest.json").is_file():
        return None, None
    for split in ("unseen_combo", "unseen_class", "train"):
        models = load_split(zoo, split, limit=1)
        if models:
            return zoo, models[0]
    return zoo, None


def warm_latency(tina, prompt: str, runs: int) -> dict:
    tina.generate(prompt, seed=0)  # first call: text encoder / lazy imports, not counted
    times = []
    for seed in range(1, runs + 1):
        t0 = time.perf_counter()
        tina.generate(prompt, seed=seed)
        times.append(time.perf_counter() - t0)
    return {"runs": runs, "median_s": round(median(times), 4), "min_s": round(min(times), 4), "all_s": [round(t, 4) for t in times]}


def batched_throughput(tina, prompt: str, n: int) -> dict:
    t0 = time.perf_counter()
    tina.generate_many([prompt] * n, seed=0)
    sec = time.perf_counter() - t0
    return {"models": n, "seconds": round(sec, 3), "models_per_s": round(n / sec, 2)}


def cold_latency(checkpoint: str, prompt: str, runs: int, tmp: Path) -> dict:
    times, outs = [], []
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for i in range(runs):
        out = tmp / f"cold-{i}"
        cmd = [sys.executable, "-m", "tina.cli", "generate", prompt, "--checkpoint", checkpoint, "-o", str(out), "--seed", str(i)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        sec = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_dir():
            raise RuntimeError(f"tina generate failed ({proc.returncode}): {proc.stderr[-2000:]}")
        times.append(sec)
        outs.append(sorted(p.name for p in out.iterdir()))
    t0 = time.perf_counter()  # how much of it is Python importing torch, diffusers and tina
    subprocess.run([sys.executable, "-c", "import tina.cli, tina.sample, tina.export"], check=True, env=env)
    import_s = time.perf_counter() - t0
    return {"runs": runs, "median_s": round(median(times), 3), "min_s": round(min(times), 3), "all_s": [round(t, 3) for t in times],
            "import_s": round(import_s, 3), "files": outs[0], "child_peak_rss_mb": peak_rss_mb(children=True), "command": " ".join(cmd[1:4] + ["PROMPT", "..."])}


def finetune_same_accuracy(tina, zoo: str, task: dict, images_per_class: int = 300) -> dict:
    """Generated accuracy of the task (seed 0, names) vs fine-tuning time from classifier selection to reach it."""
    from safetensors.torch import load_file

    from tina.training.accuracy import accuracy, task_test_set
    from tina.training.data import read_manifest
    from tina.training.datasets import load_dataset
    from evaluation.baselines import selection_flat
    from evaluation.finetune import finetune_curve

    man = read_manifest(zoo)
    dataset = load_dataset(man["dataset"])
    x, y = task_test_set(dataset, task["class_ids"], images_per_class)
    t0 = time.perf_counter()
    net = tina.generate(classes=list(task["classes"]), seed=0)
    gen_s = time.perf_counter() - t0
    target = accuracy(net, x, y)
    ft = man["config"]["finetune"]
    flat0 = selection_flat(tina.bundle.layout, load_file(Path(zoo) / "generic.safetensors"), task["class_ids"])
    max_steps = int(ft.get("steps", 100))  # the zoo's own budget: the oracle
    curve = finetune_curve(tina.bundle, flat0, list(task["classes"]), list(task["class_ids"]), dataset, x, y, ft, max_steps,
                           seed=0, target_acc=target)
    return {"task": task["key"], "classes": list(task["classes"]), "generated_acc": round(target, 4), "generate_s": round(gen_s, 3),
            "selection_acc": round(curve["acc"][0], 4), "finetune_steps_to_same_acc": curve["steps_to_target"],
            "finetune_s_to_same_acc": None if curve["seconds_to_target"] is None else round(curve["seconds_to_target"], 3),
            "max_steps": max_steps, "recipe": {"lr": ft.get("lr"), "batch_size": ft.get("batch_size")},
            "curve": {"steps": curve["steps"], "acc": [round(a, 4) for a in curve["acc"]], "seconds": [round(s, 3) for s in curve["seconds"]]}}


def run(quick: bool = False, checkpoint: str | None = None, zoo: str | None = None, prompt: str | None = None,
        device: str = "cpu") -> dict:
    from tina.sample import Tina

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tina-bench-") as d:
        tmp = Path(d)
        ckpt = _checkpoint(checkpoint, tmp, notes)
        t0 = time.perf_counter()
        tina = Tina.from_pretrained(ckpt, device=device)
        load_s = time.perf_counter() - t0
        zoo, task = _zoo_task(zoo, tina.bundle)
        if prompt is None:
            prompt = "classify " + " vs ".join(task["classes"]) if task else "classify sneakers vs sandals"
        r = {"checkpoint": ckpt, "prompt": prompt, "device": device, "threads": torch.get_num_threads(),
             "generator_parameters": sum(p.numel() for p in tina.bundle.dit.parameters()),
             "sampling": tina.bundle.meta.get("sampling", {}), "load_s": round(load_s, 3)}
        # Small generator ops on an oversubscribed CPU run far faster on one thread than on all of them
        # (OpenMP barriers wait on descheduled threads), so both are measured and the faster one counts.
        threads0 = torch.get_num_threads()
        r["warm_by_threads"] = {}
        for th in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(th)
            r["warm_by_threads"][str(th)] = warm_latency(tina, prompt, 5 if quick else 10)
        best = min(r["warm_by_threads"], key=lambda th: r["warm_by_threads"][th]["median_s"])
        r["warm"] = {**r["warm_by_threads"][best], "threads": int(best)}
        torch.set_num_threads(int(best))
        r["batched"] = batched_throughput(tina, prompt, 16 if quick else 64)
        torch.set_num_threads(threads0)
        r["cold"] = cold_latency(ckpt, prompt, 3 if quick else 5, tmp)
        if task is not None:
            r["finetune"] = finetune_same_accuracy(tina, zoo, task, 100 if quick else 300)
        else:
            notes.append("fine-tune comparison skipped: no zoo (pass --zoo, or use a checkpoint trained on a zoo that is here)")
    r["goals"] = {"warm_s": GOALS["warm_s"], "warm_ok": r["warm"]["median_s"] <= GOALS["warm_s"],
                  "cold_s": GOALS["cold_s"], "cold_ok": r["cold"]["median_s"] <= GOALS["cold_s"]}
    r["peak_rss_mb"] = peak_rss_mb()
    r["cuda_peak_mb"] = cuda_peak_mb()
    r["notes"] = notes
    return r


def rows(r: dict) -> list[tuple[str, object]]:
    g = r["goals"]
    out = [("checkpoint load s", r["load_s"]),
           (f"warm prompt → model s (median of {r['warm']['runs']}, {r['warm']['threads']} thread(s))", r["warm"]["median_s"]),
           *[(f"  warm with {th} thread(s)", w["median_s"]) for th, w in r["warm_by_threads"].items()],
           ("  goal <= 1 s", "met" if g["warm_ok"] else "NOT met"),
           (f"cold `tina generate` s (median of {r['cold']['runs']})", r["cold"]["median_s"]),
           ("  goal <= 5 s", "met" if g["cold_ok"] else "NOT met"),
           ("  of which importing tina (one run) s", r["cold"]["import_s"]),
           (f"batched models/s ({r['batched']['models']} prompts)", r["batched"]["models_per_s"])]
    ft = r.get("finetune")
    if ft:
        steps = ft["finetune_steps_to_same_acc"]
        out += [("generated acc (seed 0) / selection acc", f"{ft['generated_acc']:.3f} / {ft['selection_acc']:.3f}"),
                ("fine-tune steps to the same acc", steps if steps is not None else f"> {ft['max_steps']}"),
                ("fine-tune s to the same acc", ft["finetune_s_to_same_acc"] if steps is not None else f"> {ft['curve']['seconds'][-1]}")]
    out += [("peak RSS MiB (this process)", r["peak_rss_mb"]), ("peak RSS MiB (cold CLI child)", r["cold"]["child_peak_rss_mb"])]
    if r.get("cuda_peak_mb") is not None:
        out.append(("CUDA peak MiB", r["cuda_peak_mb"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--checkpoint")
    ap.add_argument("--zoo")
    ap.add_argument("--prompt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    r = run(args.quick, args.checkpoint, args.zoo, args.prompt, args.device)
    print_table("generation latency", rows(r))
    for n in r["notes"]:
        print(f"  note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
