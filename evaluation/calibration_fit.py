"""Fit and check the expected-accuracy predictor of tina/expected.py from calibration rows.

A row is one generated model: its task's class matches, features (tina/expected.py task_features)
and its accuracy on real test images (evaluation/calibrate.py measures them). Everything here is
fitted on the fit rows (val and held-out class sets) only; `check` scores rows never fitted on.

  * resolution: P(a class resolves to its true known class | similarity, margin), a logistic over
    every class not named exactly;
  * predictor: a logistic model of z = (accuracy - 1/k) / (1 - 1/k) in FEATURES;
  * range: the spread of the standardised residual (z - z_hat) * sqrt(k) within bins of the expected
    share of misresolved classes (BIN_FEATURE). z is not clipped, so a range can reach below chance
    (most models of unrelated words score under chance about half the time), and sqrt(k) because a
    task's accuracy averages k per-class recalls (residual spread on Fashion-MNIST and clip art
    falls about as 1/sqrt(k)). The percentiles are the narrowest of RANGE_GRID whose 5-fold
    cross-validated coverage on the fit rows (folds by task) reaches TARGET_COVERAGE;
  * thresholds: the unknown-class similarity (a class resolves to its true class half the time) and
    the near-chance cut on the expected z (the balanced-accuracy-best cut for telling models whose
    measured z is under NEAR_CHANCE_Z).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tina.expected import BIN_FEATURE, FEATURES, NEAR_CHANCE_Z, predict, predictor_eta

N_BINS = 4  # quartiles of the unresolved share (as before the range moved to z / sqrt(k))
TARGET_COVERAGE = 0.8  # the range is an 80% range
RANGE_GRID = (0.80, 0.85, 0.90, 0.95, 0.98)  # nominal central coverages tried, narrowest first
FOLDS = 5


def z_of(row: dict) -> float:
    """(accuracy - chance) / (1 - chance), unclipped: negative under chance."""
    chance = 1.0 / row["k"]
    return (row["accuracy"] - chance) / (1 - chance)


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


def _fit_mean(rows: list[dict]) -> dict:
    x = torch.tensor([[r["features"][f] for f in FEATURES] for r in rows], dtype=torch.float64)
    z = torch.tensor([min(max(z_of(r), 0.0), 1.0) for r in rows], dtype=torch.float64)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    w, b = _logistic((x - mean) / scale, z)
    return {"features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist(), "weights": w.tolist(), "bias": float(b)}


def _std_residuals(mean_model: dict, rows: list[dict]) -> np.ndarray:
    z_hat = [1 / (1 + math.exp(-predictor_eta(mean_model, r["features"]))) for r in rows]
    return np.array([(z_of(r) - zh) * math.sqrt(r["k"]) for r, zh in zip(rows, z_hat)])


def _bins(keys: np.ndarray, resid: np.ndarray, coverage: float) -> list[dict]:
    q = ((1 - coverage) / 2, (1 + coverage) / 2)
    edges = np.unique(np.quantile(keys, np.linspace(0, 1, N_BINS + 1)[1:-1])).tolist() + [math.inf]
    out, lo = [], -math.inf
    for upto in edges:
        sel = (keys > lo) & (keys <= upto)
        r = resid[sel] if sel.sum() >= 5 else resid
        out.append({"upto": float(upto) if upto < math.inf else 1e9, "low": float(np.quantile(r, q[0])),
                    "high": float(np.quantile(r, q[1])), "rows": int(sel.sum())})
        lo = upto
    return out


def _cv_coverage(rows: list[dict]) -> dict[float, float]:
    """{nominal coverage: share of fit rows inside the range fitted on the other folds}, for RANGE_GRID
    (folds by task, so the forms of a task stay together; one mean fit per fold)."""
    tasks = sorted({(r["split"], r["task"]) for r in rows})
    fold = {t: i % FOLDS for i, t in enumerate(tasks)}
    inside: dict[float, list[bool]] = {c: [] for c in RANGE_GRID}
    for f in range(FOLDS):
        train = [r for r in rows if fold[(r["split"], r["task"])] != f]
        held = [r for r in rows if fold[(r["split"], r["task"])] == f]
        if not held or len(train) < 10:
            continue
        m = _fit_mean(train)
        keys, resid = np.array([r["features"][BIN_FEATURE] for r in train]), _std_residuals(m, train)
        for c in RANGE_GRID:
            p = m | {"bins": _bins(keys, resid, c), "bin_feature": BIN_FEATURE}
            for r in held:
                _, lo, hi = predict(p, r["features"], r["k"])
                inside[c].append(lo <= r["accuracy"] <= hi)
    return {c: float(np.mean(v)) if v else float("nan") for c, v in inside.items()}


def _assemble(rows: list[dict], coverage: float) -> dict:
    m = _fit_mean(rows)
    keys = np.array([r["features"][BIN_FEATURE] for r in rows])
    return m | {"bins": _bins(keys, _std_residuals(m, rows), coverage), "bin_feature": BIN_FEATURE,
                "range": "z_hat + residual / sqrt(k)", "coverage": coverage,
                "target": "z = (accuracy - 1/k) / (1 - 1/k), logistic"}


def fit_predictor(rows: list[dict]) -> dict:
    """The logistic predictor with its range bins (tina/expected.py reads it); the range's percentiles
    are the narrowest whose cross-validated coverage on these rows alone reaches TARGET_COVERAGE."""
    cv = _cv_coverage(rows)
    chosen = next((c for c in RANGE_GRID if cv[c] >= TARGET_COVERAGE), RANGE_GRID[-1])
    return _assemble(rows, chosen) | {"cv_coverage": {f"{c:.2f}": round(v, 4) for c, v in cv.items()}}


def class_points(rows: list[dict]) -> list[dict]:
    """Every class not named exactly (degraded prompts, held-out class names), with whether it
    resolved to its true class (a held-out class never does)."""
    return [m for r in rows for m in r["matches"] if m["name"].lower() != m["known"].lower()]


def fit_resolution(rows: list[dict]) -> dict | None:
    """Logistic P(resolves to the true class | similarity, margin) (tina/expected.py resolution_probability)."""
    pts = class_points(rows)
    if len(pts) < 10 or len({m["resolved_true"] for m in pts}) < 2:
        return None
    x = torch.tensor([[m["similarity"], m["margin"]] for m in pts], dtype=torch.float64)
    w, b = _logistic(x, torch.tensor([float(m["resolved_true"]) for m in pts], dtype=torch.float64), l2=0.0)
    return {"weights": w.tolist(), "bias": float(b), "classes": len(pts)}


def fit_unknown_threshold(rows: list[dict]) -> dict:
    """Similarity at which a class not named exactly resolves to its true class with probability 1/2."""
    pts = class_points(rows)
    if len(pts) < 10 or len({m["resolved_true"] for m in pts}) < 2:
        return {"value": None, "classes": len(pts)}
    s = torch.tensor([m["similarity"] for m in pts], dtype=torch.float64)[:, None]
    y = torch.tensor([float(m["resolved_true"]) for m in pts], dtype=torch.float64)
    w, b = _logistic(s, y, l2=0.0)
    return {"value": float(-b / w[0]), "classes": len(pts), "resolved_true": int(y.sum()), "slope": float(w[0])}


def fit_near_chance(predictor: dict, rows: list[dict]) -> dict:
    """The cut on the expected z under which a model is flagged near chance: the one that best separates
    (balanced accuracy) fit rows measured under NEAR_CHANCE_Z from the rest."""
    z_hat = np.array([1 / (1 + math.exp(-predictor_eta(predictor, r["features"]))) for r in rows])
    near = np.array([z_of(r) < NEAR_CHANCE_Z for r in rows])
    if near.all() or not near.any():
        return {"value": NEAR_CHANCE_Z, "rows": len(rows), "note": "fit rows are all on one side; the definition is used"}
    best = (-1.0, NEAR_CHANCE_Z)
    for t in np.unique(np.round(z_hat, 3)):
        flag = z_hat < t
        bal = 0.5 * (flag[near].mean() + (~flag[~near]).mean())
        best = max(best, (float(bal), float(t)))
    return {"value": best[1], "balanced_accuracy": round(best[0], 4), "rows": len(rows), "near_chance_rows": int(near.sum()),
            "definition": f"measured z = (accuracy - chance) / (1 - chance) under {NEAR_CHANCE_Z}"}


def check(predictor: dict, rows: list[dict], near_chance: float | None = None) -> dict:
    """MAE and 80%-range coverage on rows the predictor was not fitted on, overall and per prompt form;
    with `near_chance`, how well the near-chance warning flags models measured near chance."""

    def stats(rs):
        err, inside = [], []
        for r in rs:
            e, lo, hi = predict(predictor, r["features"], r["k"])
            r["expected"], r["low"], r["high"] = e, lo, hi
            err.append(abs(e - r["accuracy"]))
            inside.append(lo <= r["accuracy"] <= hi)
        return {"rows": len(rs), "mae": float(np.mean(err)), "coverage": float(np.mean(inside)),
                "mean_accuracy": float(np.mean([r["accuracy"] for r in rs])),
                "mean_expected": float(np.mean([r["expected"] for r in rs])),
                "mean_width": float(np.mean([r["high"] - r["low"] for r in rs]))}

    if not rows:
        return {"rows": 0}
    out = stats(rows)
    out["by_form"] = {f: stats([r for r in rows if r["form"] == f]) for f in dict.fromkeys(r["form"] for r in rows)}
    if near_chance is not None:
        flag = np.array([(r["expected"] - 1 / r["k"]) < near_chance * (1 - 1 / r["k"]) for r in rows])
        near = np.array([z_of(r) < NEAR_CHANCE_Z for r in rows])
        out["near_chance_warning"] = {
            "flagged": int(flag.sum()), "measured_near_chance": int(near.sum()),
            "recall": float(flag[near].mean()) if near.any() else None,  # near-chance models that get the warning
            "precision": float(near[flag].mean()) if flag.any() else None}  # warned models that are near chance
    return out
