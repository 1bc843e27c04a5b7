"""Diversity and multi-step sampling: does sampling give distinct, good models, and do they ensemble?

One DDIM step from pure noise returns the DiT's x0 prediction at the noisiest timestep, the conditional
mean E[weights | classes] (the "mean model"). With S steps (DDIM, tina/diffusion.py) the sampler draws from
the learned distribution instead. For `tasks` tasks and each S: the accuracy of single samples, the share
of test images on which two samples of a task disagree (compared with two training runs of the same class
set, the zoo's own spread), and an ensemble of the N samples (probabilities averaged) against the mean model.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from evaluation.config import DiversityConfig
from evaluation.generation import generate_flats
from evaluation.scoring import accuracies, disagreement, flat_probs
from evaluation.statistics import paired_bootstrap


def measure(tina, tasks: list, test_sets: list[tuple], cfg: DiversityConfig, seed: int, batch_size: int,
            eval_batch: int = 4096, device="cpu", guidance: float | None = None, strength: float | None = None) -> dict:
    """tasks: tina.sample.Task per task (names prompts); test_sets: (x, y) per task. DDIM throughout, at the
    evaluation's guidance and strength (None: the checkpoint's), so the one-step mean here is the model the
    other tables score and the samples are what `tina generate --steps S` draws."""
    from tina.diffusion import resolve_sampling

    bundle = tina.bundle
    settings = resolve_sampling(bundle.meta.get("sampling", {}), guidance=guidance, strength=strength)
    guidance, strength = settings.guidance, settings.strength

    def flats_for(steps: int, seeds: list[int]) -> dict:
        out = {}
        for sd in seeds:
            got = generate_flats(tina, [(i, t) for i, t in enumerate(tasks)], sd, batch_size, steps=steps, sampler="ddim",
                                 guidance=guidance, strength=strength)
            out.update({(i, sd): f for i, f in got.items()})
        return out

    seeds = [seed + j for j in range(cfg.samples)]
    mean_flats = flats_for(1, [seed])
    mean_acc = []
    for i, (x, y) in enumerate(test_sets):
        mean_acc.append(float(accuracies(flat_probs(bundle, mean_flats[(i, seed)][None], len(tasks[i].classes), x,
                                                    eval_batch, device), y)[0]))
    by_steps = {}
    for steps in cfg.steps:
        flats = flats_for(steps, seeds)
        single, dis, ens = [], [], []
        for i, (x, y) in enumerate(test_sets):
            probs = flat_probs(bundle, torch.stack([flats[(i, sd)] for sd in seeds]), len(tasks[i].classes), x, eval_batch, device)
            single.append(accuracies(probs, y).tolist())  # (N,)
            dis.append(float(np.mean([disagreement(probs[a], probs[b]) for a, b in itertools.combinations(range(len(seeds)), 2)]))
                       if len(seeds) > 1 else 0.0)
            ens.append(float(accuracies(probs.mean(0, keepdim=True), y)[0]))
        single = np.asarray(single)  # (tasks, N)
        by_steps[str(steps)] = {
            "single_acc": float(single.mean()), "single_acc_std_samples": float(single.std(1).mean()),
            "disagreement": float(np.mean(dis)), "ensemble_acc": float(np.mean(ens)),
            "single_minus_mean_model": float(single.mean() - np.mean(mean_acc)),
            "ensemble_minus_mean_model": float(np.mean(ens) - np.mean(mean_acc)),
            # paired over tasks: how far the step count's gap could be on other tasks (choose strength on these, on val)
            "single_minus_mean_model_ci": _interval(single.mean(1), mean_acc),
            "ensemble_minus_mean_model_ci": _interval(ens, mean_acc),
            "per_task": {"single": single.round(5).tolist(), "ensemble": ens, "disagreement": dis},
        }
    return {"tasks": len(tasks), "samples": len(seeds), "sampler": "ddim", "guidance": guidance, "strength": strength,
            "mean_model": {"steps": 1, "acc": float(np.mean(mean_acc)), "per_task": mean_acc}, "by_steps": by_steps}


def _interval(a, b) -> list[float]:
    """Paired bootstrap 95% interval of mean(a - b) over tasks."""
    r = paired_bootstrap(a, b)
    return [r["lo"], r["hi"]]
