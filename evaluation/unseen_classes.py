"""Strict unseen classes: tasks that mix classes held out of *everything* with known ones.

A zoo built with `tasks.held_out_classes=N` keeps N classes away from the generic model, from every
train/val/unseen_combo task, from the generator's vocabulary and anchor, and from its image projector
(zoo_builder/tasks.py, generic.py; tina/training/data.py load_anchor; tina/projector.py). Its `unseen_class`
split holds tasks with at least one such class; each was fine-tuned with the held-out class's real
images (the oracle) starting from "nearest known class" selection (the held-out class borrows the
generic row of the known class whose name embedding is closest: the baseline).

For every such task this measures, on the same test images, overall and on the held-out classes'
images alone: chance (1/k), nearest-known-class selection, the oracle, and the generator prompted by
names, by stored descriptions, and by 1 or 5 training images per held-out class (image prompts, when
the checkpoint has a projector). "Halfway" = (generated - chance) / (oracle - chance) on held-out images.

    python -m evaluation.unseen_classes --zoo zoos/clipart --checkpoint runs/clipart/bundle --out docs/results/unseen_classes_clipart.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from tina.atomic import atomic_write_text
from tina.errors import TinaError
from tina.imprint import imprint
from tina.training.accuracy import task_test_set
from tina.validate import ArgumentParser

log = logging.getLogger(__name__)

DESCRIPTION_VARIANT = 6  # tina.prompts.class_variants: plain name, 5 templates, then 2 descriptions


def _predict(net, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return torch.cat([net(x[i : i + 2048]).argmax(-1) for i in range(0, len(x), 2048)])


def _scores(pred: torch.Tensor, y: torch.Tensor, held_mask: torch.Tensor) -> dict:
    ok = (pred == y).float()
    return {"all": float(ok.mean()), "held_out": float(ok[held_mask].mean()), "known": float(ok[~held_mask].mean()) if (~held_mask).any() else float("nan")}


def evaluate_unseen(zoo: str | Path, checkpoint: str, tasks: int = 0, shots: tuple[int, ...] = (1, 5), seed: int = 0,
                    per_class: int | None = None) -> dict:
    """Per-task and mean accuracies of every method on the zoo's unseen_class split (see module doc)."""
    from safetensors.torch import load_file

    from tina.training.data import load_split, read_manifest
    from tina.training.datasets import load_dataset
    from tina.layout import ParamLayout
    from tina.sample import Tina
    from tina.weights import assemble
    from zoo_builder.tasks import nearest_known
    from evaluation.baselines import selection_flat

    zoo = Path(zoo)
    man = read_manifest(zoo)
    held = [int(c) for c in man.get("held_out_classes", [])]
    if not held:
        raise TinaError(f"zoo {zoo} holds no classes out (tasks.held_out_classes=0): nothing unseen to measure")
    models = load_split(zoo, "unseen_class", limit=tasks or None)
    if not models:
        raise TinaError(f"zoo {zoo} has no unseen_class tasks (tasks.unseen_class=0)")
    tina = Tina.from_pretrained(checkpoint)
    vocab = {n.lower() for n in tina.bundle.vocab}
    leaked = [man["dataset"]["classes"][c] for c in held if man["dataset"]["classes"][c].lower() in vocab]
    if leaked:
        raise TinaError(f"the generator's vocabulary names held-out classes {leaked}: not a strict unseen-class test")
    dataset = load_dataset(man["dataset"])
    layout = ParamLayout.from_dict(man["layout"])
    generic = load_file(str(zoo / "generic.safetensors"))
    proxy = nearest_known(load_file(str(zoo / "vocab.safetensors"))["names"], held)
    has_projector = bool(tina.bundle.projector)
    rng = np.random.default_rng(seed)
    per_task = []
    for m in models:
        ids, names = [int(c) for c in m["class_ids"]], list(m["classes"])
        x, y = task_test_set(dataset, ids, per_class)
        held_pos = torch.tensor([c in held for c in ids])
        held_mask = held_pos[y]
        k = len(ids)
        row = {"task": m["key"], "k": k, "held_out": [names[i] for i in range(k) if held_pos[i]],
               "nearest_known": {dataset.classes[c]: dataset.classes[proxy[c]] for c in ids if c in held},
               "chance": {"all": 1.0 / k, "held_out": 1.0 / k, "known": 1.0 / k}}  # fmt: skip
        oracle = assemble(man["target"], dataset.image, layout, m["params"], names)
        row["oracle"] = _scores(_predict(oracle, x), y, held_mask)
        sel = selection_flat(layout, generic, ids, proxy)
        row["nearest_known_selection"] = _scores(_predict(assemble(man["target"], dataset.image, layout, sel, names), x), y, held_mask)
        row["generated_names"] = _scores(_predict(tina.generate(classes=names, seed=seed), x), y, held_mask)
        descriptions = [m["prompts"][i][DESCRIPTION_VARIANT] if held_pos[i] else names[i] for i in range(k)]
        task = tina.make_task(classes=names)
        task.cond[held_pos] = torch.nn.functional.normalize(tina.encoder.encode([d for d, h in zip(descriptions, held_pos) if h]).float(), dim=-1)
        row["generated_description"] = _scores(_predict(tina.generate_tasks([task], seed=seed)[0], x), y, held_mask)
        for n in shots:
            images = {}
            for i in range(k):
                if held_pos[i]:  # training images of the held-out class: its only "prompt"
                    pool = np.flatnonzero(dataset.train_y == ids[i])
                    images[names[i]] = dataset.tensors("train", np.sort(rng.choice(pool, min(n, len(pool)), replace=False)))[0]
            if has_projector:
                row[f"generated_image_{n}shot"] = _scores(_predict(tina.generate(classes=names, images=images, seed=seed), x), y, held_mask)
            row[f"imprinted_{n}shot"] = _scores(_predict(tina.generate(classes=names, images=images, seed=seed, imprint=True), x), y, held_mask)
        per_task.append(row)
    methods = [k for k in per_task[0] if isinstance(per_task[0][k], dict) and "all" in per_task[0][k]]
    summary = {}
    for meth in methods:
        summary[meth] = {part: round(float(np.nanmean([r[meth][part] for r in per_task])), 4) for part in ("all", "held_out", "known")}
    for meth in methods:
        if meth not in ("chance", "oracle"):
            gap = summary["oracle"]["held_out"] - summary["chance"]["held_out"]
            summary[meth]["halfway_held_out"] = round((summary[meth]["held_out"] - summary["chance"]["held_out"]) / gap, 3) if gap > 0 else None
    return {"zoo": str(zoo), "checkpoint": str(checkpoint), "dataset": man["dataset"]["name"],
            "held_out_classes": [dataset.classes[c] for c in held], "tasks": len(per_task),
            "mean_k": round(float(np.mean([r["k"] for r in per_task])), 2), "summary": summary, "per_task": per_task}  # fmt: skip


def choose_win_rate(zoo: str | Path, checkpoint: str, tasks: int = 0, shots: int = 5, rates=(0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
                    seed: int = 0, per_class: int | None = None) -> dict:
    """The val protocol behind tina/imprint.py's WIN_RATE: on the zoo's val tasks (known classes only),
    one class per task plays the unseen class; its generated row is replaced by an imprinted one from
    `shots` training images, for each candidate win rate. Accuracy overall and on that class's images."""
    from tina.training.data import load_split, read_manifest
    from tina.training.datasets import load_dataset
    from tina.sample import Tina

    models = load_split(zoo, "val", limit=tasks or None)
    if not models:
        raise TinaError(f"zoo {zoo} has no val tasks (tasks.val=0): nothing to choose the win rate on")
    man = read_manifest(zoo)
    tina = Tina.from_pretrained(checkpoint)
    dataset = load_dataset(man["dataset"])
    rng = np.random.default_rng(seed)
    per_task = []
    for m in models:
        ids, names = [int(c) for c in m["class_ids"]], list(m["classes"])
        x, y = task_test_set(dataset, ids, per_class)
        pick = int(rng.integers(len(ids)))
        mask = y == pick
        pool = np.flatnonzero(dataset.train_y == ids[pick])
        images = dataset.tensors("train", np.sort(rng.choice(pool, min(shots, len(pool)), replace=False)))[0]
        net = tina.generate(classes=names, seed=seed)
        row = {"task": m["key"], "k": len(ids), "class": names[pick], "generated_names": _scores(_predict(net, x), y, mask)}
        rows = net.head.weight.clone(), net.head.bias.clone()
        for rate in rates:
            with torch.no_grad():
                net.head.weight.copy_(rows[0]), net.head.bias.copy_(rows[1])
            imprint(net, {pick: images}, win_rate=rate)
            row[f"imprinted_rate_{rate}"] = _scores(_predict(net, x), y, mask)
        per_task.append(row)
    methods = [k for k in per_task[0] if isinstance(per_task[0][k], dict)]
    summary = {meth: {part: round(float(np.mean([r[meth][part] for r in per_task])), 4) for part in ("all", "held_out")} for meth in methods}
    best = max(rates, key=lambda rate: (summary[f"imprinted_rate_{rate}"]["all"], -rate))
    return {"zoo": str(zoo), "checkpoint": str(checkpoint), "split": "val", "tasks": len(per_task), "shots": shots,
            "chosen_win_rate": best, "summary": summary, "per_task": per_task}


def markdown(r: dict) -> str:
    lines = [f"{r['dataset']}: {r['tasks']} unseen-class tasks (mean k {r['mean_k']}), held out: {', '.join(r['held_out_classes'])}", "",
             "| method | all images | held-out classes' images | known classes' images | halfway (held-out) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for meth, s in r["summary"].items():
        half = s.get("halfway_held_out")
        lines.append(f"| {meth} | {s['all']:.3f} | {s['held_out']:.3f} | {s['known']:.3f} | {'' if half is None else f'{half:.2f}'} |")
    return "\n".join(lines)


def markdown_val(r: dict) -> str:
    lines = [f"val protocol: {r['tasks']} val tasks, one known class each imprinted from {r['shots']} images; "
             f"chosen win rate {r['chosen_win_rate']}", "", "| method | all images | that class's images |", "|---|---|---|"]
    lines += [f"| {meth} | {s['all']:.3f} | {s['held_out']:.3f} |" for meth, s in r["summary"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m evaluation.unseen_classes", description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", required=True, help="a zoo built with tasks.held_out_classes > 0 and tasks.unseen_class > 0")
    ap.add_argument("--checkpoint", required=True, help="a generator trained on that zoo")
    ap.add_argument("--tasks", type=int, default=0, help="at most this many tasks (0 = all)")
    ap.add_argument("--shots", type=int, nargs="*", default=[1, 5], help="image-prompt shots per held-out class")
    ap.add_argument("--out", default=None, help="write the JSON here (and the table beside it as .md)")
    ap.add_argument("--val", action="store_true", help="instead: choose imprinting's win rate on the val split (known classes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.val:
            r = choose_win_rate(args.zoo, args.checkpoint, args.tasks, max(args.shots or [5]))
        else:
            r = evaluate_unseen(args.zoo, args.checkpoint, args.tasks, tuple(args.shots))
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown_val(r) if args.val else markdown(r)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(r, indent=1))
        atomic_write_text(out.with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
