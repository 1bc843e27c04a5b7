"""The fine-tuning budget: how many real fine-tuning steps from classifier selection match the generator."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.baselines import selection_flat
from evaluation.config import STEP_GRID


def recipe_lr(step: int, total: int, finetune: dict) -> float:
    """The zoo builder's learning rate (zoo_builder.fit.lr_at) at `step` of a `total`-step run, its warm-up
    scaled to the run's length. Zoos built before the schedule existed (no warmup_steps in their config)
    used a constant rate."""
    from zoo_builder.fit import lr_at

    lr = float(finetune.get("lr", 1e-3))
    if "warmup_steps" not in finetune:
        return lr
    zoo_steps = max(1, int(finetune.get("steps", total) or total))
    return lr_at(step, total, lr, round(int(finetune["warmup_steps"]) * total / zoo_steps))


class _TrainPool:
    """Class-balanced minibatches of one task's training images, as the zoo builder draws them."""

    def __init__(self, dataset, class_ids: list[int], per_class: int, gen: torch.Generator):
        pools = []
        for c in class_ids:
            idx = np.flatnonzero(np.asarray(dataset.train_y) == c)
            if per_class and len(idx) > per_class:
                idx = np.sort(idx[torch.randperm(len(idx), generator=gen)[:per_class].numpy()])
            pools.append(torch.from_numpy(idx))
        self.dataset, self.k = dataset, len(class_ids)
        self.counts = torch.tensor([len(p) for p in pools])
        self.order = torch.cat(pools)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.randint(0, self.k, (size,), generator=gen)  # (B,) class positions = labels
        j = (torch.rand(size, generator=gen) * self.counts[pos]).long()
        x, _ = self.dataset.tensors("train", self.order[self.starts[pos] + j].numpy())
        return x, pos


def finetune_curve(bundle, flat0: torch.Tensor, classes: list[str], class_ids: list[int], dataset, x: torch.Tensor,
                   y: torch.Tensor, finetune: dict, max_steps: int, seed: int = 0, target_acc: float | None = None,
                   device: str | torch.device = "cpu") -> dict:
    """Test accuracy after S fine-tuning steps from `flat0`, for the budgets S of STEP_GRID up to max_steps.

    The zoo builder's recipe (`finetune`: the manifest's config["finetune"]): Adam with the zoo's lr (head
    rows at lr * head_lr_mult), class-balanced batches of the zoo's batch size from at most train_per_class
    images per class, and its schedule. With a warm-up + cosine schedule every budget S is a fresh run whose
    schedule spans S steps (reading accuracy midway through one long run would understate what S steps can
    do); with a constant rate one run is read along the way. Returns {"steps", "acc", "seconds" (training
    time of the run that gave each point)}, plus "steps_to_target"/"seconds_to_target" (None when not
    reached) when `target_acc` is given, in which case it stops at the first budget that reaches it.
    """
    from tina.training.accuracy import accuracy
    from tina.weights import build_model
    from tina.targets import get_target

    spec = get_target(bundle.target)
    batch = int(finetune.get("batch_size", 32))
    head_mult = float(finetune.get("head_lr_mult", 1.0))
    pool = _TrainPool(dataset, class_ids, int(finetune.get("train_per_class", 0) or 0), torch.Generator().manual_seed(seed))
    grid = [s for s in STEP_GRID if s <= max_steps]
    if grid[-1] != max_steps:
        grid.append(max_steps)

    def fresh():
        net = build_model(bundle, flat0, classes).to(device)
        groups = {"head": [], "body": []}
        for n, p in net.named_parameters():
            p.requires_grad_(spec.is_generated(n))
            if spec.is_generated(n):
                groups["head" if n.startswith("head.") else "body"].append(p)
        opt = torch.optim.Adam([g for g in ({"params": groups["head"], "lr_mult": head_mult},
                                             {"params": groups["body"], "lr_mult": 1.0}) if g["params"]])
        return net, opt

    def train(net, opt, start: int, stop: int, total: int, gen: torch.Generator) -> float:
        t0 = time.perf_counter()
        net.train()
        for step in range(start, stop):
            for g in opt.param_groups:
                g["lr"] = recipe_lr(step, total, finetune) * g["lr_mult"]
            xb, yb = pool.batch(batch, gen)
            loss = F.cross_entropy(net(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    one_run = "warmup_steps" not in finetune
    out = {"steps": [], "acc": [], "seconds": [], "schedule": "constant lr, one run" if one_run else "warm-up + cosine, a run per budget"}
    net, opt = fresh()
    gen, done, spent = torch.Generator().manual_seed(seed + 1), 0, 0.0
    for budget in grid:
        if one_run:
            spent += train(net, opt, done, budget, max_steps, gen)
            done = budget
        else:
            net, opt = fresh()
            spent = train(net, opt, 0, budget, budget, torch.Generator().manual_seed(seed + 1))
        acc = accuracy(net, x, y)
        out["steps"].append(budget)
        out["acc"].append(acc)
        out["seconds"].append(spent)
        if target_acc is not None and acc >= target_acc:
            break
    if target_acc is not None:
        hit = next((i for i, a in enumerate(out["acc"]) if a >= target_acc), None)
        out["target_acc"] = target_acc
        out["steps_to_target"] = out["steps"][hit] if hit is not None else None
        out["seconds_to_target"] = out["seconds"][hit] if hit is not None else None
    return out



def finetune_budget(cfg, man, bundle, dataset, splits, results, generic) -> dict:
    """Fine-tuning steps from classifier selection to each task's generated accuracy; median over tasks."""
    from tqdm.auto import tqdm

    from tina.training.accuracy import task_test_set

    split = cfg.finetune.split if cfg.finetune.split in splits else next(iter(splits))
    ft = man.get("config", {}).get("finetune", {})
    max_steps = cfg.finetune.max_steps or int(ft.get("steps", 100))
    per_task, t0 = [], time.perf_counter()
    records = results["splits"][split]["per_task"]
    for i, m in enumerate(tqdm(splits[split][: cfg.finetune.tasks], desc="fine-tune budget", unit="task", disable=None)):
        target = float(np.mean(records[i]["generated"]["names"]))
        x, y = task_test_set(dataset, m["class_ids"], cfg.images_per_class or None)
        curve = finetune_curve(bundle, selection_flat(bundle.layout, generic, m["class_ids"]), list(m["classes"]),
                               list(m["class_ids"]), dataset, x, y, ft, max_steps, seed=cfg.finetune.seed + i,
                               target_acc=target, device=cfg.device)
        curve.update(key=m["key"], k=len(m["classes"]))
        per_task.append(curve)
    steps = [c["steps_to_target"] if c["steps_to_target"] is not None else math.inf for c in per_task]
    med = float(np.median(steps)) if steps else float("nan")
    secs = [c["seconds_to_target"] for c in per_task if c["seconds_to_target"] is not None]
    return {"split": split, "tasks": len(per_task), "max_steps": max_steps,
            "recipe": {"optimizer": "Adam", "lr": ft.get("lr"), "warmup_steps": ft.get("warmup_steps"),
                       "head_lr_mult": ft.get("head_lr_mult", 1.0), "batch_size": ft.get("batch_size"),
                       "train_per_class": ft.get("train_per_class"), "init": "classifier selection", "zoo_steps": ft.get("steps"),
                       "schedule": per_task[0]["schedule"] if per_task else None},
            "median_steps": med if math.isfinite(med) else None,
            "median_steps_text": (f"{med:g}" if math.isfinite(med) else f"> {max_steps}"),
            "reached": int(sum(math.isfinite(s) for s in steps)),
            "median_seconds_reached": float(np.median(secs)) if secs else None,
            "seconds": round(time.perf_counter() - t0, 1), "per_task": per_task}


