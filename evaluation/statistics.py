"""Summaries of accuracies over tasks and seeds, paired differences, and each split's headline."""

from __future__ import annotations

import math

import numpy as np

from evaluation.config import DIFFERENCES, HURTING_FORMS
from tina.training.accuracy import gain_captured


def summary(values: np.ndarray) -> dict:
    """values (tasks, seeds) → mean, std over tasks (of seed means), std over seeds (of task means)."""
    values = np.asarray(values, dtype=np.float64)
    per_task = values.mean(1)
    per_seed = values.mean(0)
    return {"mean": float(per_task.mean()), "std_tasks": float(per_task.std(ddof=1)) if len(per_task) > 1 else 0.0,
            "std_seeds": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0, "per_seed": per_seed.round(5).tolist(),
            "n_tasks": int(values.shape[0]), "n_seeds": int(values.shape[1])}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """mean of a - b over tasks with its standard error."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se}


def paired_bootstrap(a, b, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a - b over tasks with a percentile bootstrap interval (level, default 95%).

    a, b (n,): two methods' accuracies on the same n tasks, each task scored on the same images by both.
    Tasks are resampled with replacement and a resample keeps both methods' numbers of a task together
    (paired), so the variation the two share (an easy task, a hard image set) cancels in the difference.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "excludes_zero": False}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)  # (resamples,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(d)),
            "excludes_zero": bool(lo > 0 or hi < 0)}


def differences(per_task: list[dict], resamples: int, seed: int = 0) -> dict:
    """The headline differences (config.DIFFERENCES) present in these task records, each with its interval."""
    def values(name):
        if name == "generated":
            return [float(np.mean(t["generated"]["names"])) for t in per_task]
        if all(t.get(name) is not None for t in per_task):
            return [t[name] for t in per_task]
        return None

    out = {}
    for a, b in DIFFERENCES:
        va, vb = values(a), values(b)
        if va is not None and vb is not None:
            out[f"{a} - {b}"] = paired_bootstrap(va, vb, resamples, seed)
    return out


def split_summary(per_task: list[dict], forms: list[str], baselines: list[str], resamples: int = 2000) -> dict:
    """Means ± stds per form and baseline, the checks, the headline and accuracy by k for one split."""
    gen = {f: np.array([t["generated"][f] for t in per_task]) for f in forms}  # (tasks, seeds)
    base = {b: np.array([[t[b]] for t in per_task]) for b in baselines}
    out = {"tasks": len(per_task), "generated": {f: summary(v) for f, v in gen.items()},
           "baselines": {b: summary(v) for b, v in base.items()}}
    zoo_oracle = [t["zoo_oracle"] for t in per_task if t["zoo_oracle"] is not None]
    if zoo_oracle:
        out["baselines"].setdefault("oracle", {})["zoo_mean"] = float(np.mean(zoo_oracle))
    names = gen["names"].mean(1)
    g = float(names.mean())
    head: dict = {"generated": g}
    if "oracle" in base:
        o = float(base["oracle"].mean())
        head["oracle"], head["ratio_to_oracle"] = o, g / o if o > 0 else float("nan")
    if "selection" in base:
        head["selection"] = float(base["selection"].mean())
    if "oracle" in base and "selection" in base:
        o, s = head["oracle"], head["selection"]
        head["gain_captured"] = gain_captured(g, o, s)  # ratio of the split's means; None when o - s < MIN_ORACLE_GAIN
    checks = {}
    if "shuffled" in gen:  # equivariance: permuting the prompt must not change accuracy beyond noise
        p = paired(gen["shuffled"].mean(1), names)
        seed_noise = float(np.mean(gen["names"].std(1, ddof=1))) if gen["names"].shape[1] > 1 else 0.0
        p["ok"] = bool(abs(p["diff"]) <= max(2 * p["se"], 0.01) if not math.isnan(p["se"]) else abs(p["diff"]) <= 0.01)
        p["seed_noise"] = seed_noise
        checks["shuffled_vs_names"] = p
    for f in HURTING_FORMS:  # text must steer the weights: wrong text must lose accuracy
        if f in gen:
            p = paired(names, gen[f].mean(1))
            p["ok"] = bool(p["diff"] > 2 * p["se"]) if not math.isnan(p["se"]) else bool(p["diff"] > 0)
            checks[f"names_minus_{f}"] = p
    head["checks"] = checks
    head["differences"] = differences(per_task, resamples)
    out["headline"] = head
    by_k: dict = {}
    for k in sorted({t["k"] for t in per_task}):
        idx = [j for j, t in enumerate(per_task) if t["k"] == k]
        row = {"n": len(idx), "generated": float(names[idx].mean()), "chance": 1.0 / k}
        for b in baselines:
            row[b] = float(base[b][idx].mean())
        by_k[str(k)] = row
    out["by_k"] = by_k
    out["per_task"] = per_task
    return out


