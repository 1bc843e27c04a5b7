"""Memorization and novelty: are generated models copies of training-zoo members, averages of them, or new?

Weight-space distance between two models of the same k classes in the same order is the RMS difference of
their flat vectors in the layout's normalised units ((a - b) / std per parameter; with a residual generator
std is the spread of the personalization, so 1.0 is "as far apart as typical personalizations"). A zoo model
can be compared with a task's model when it contains all of the task's classes: its body, and its head rows
of those classes put in the task's order (a sub-classifier of the same classes).

For each generated model: the nearest training model by that distance, streamed over the whole training
zoo (NearestZoo), and the share of test images on which the two agree. The reference for "close" comes from
the zoo itself: pairs of training runs of the same class set (SameSetRuns: two fine-tunings of the same task
from the same init with different minibatches), and the task's own oracle against its nearest *other*
training model. A generated model is
  copy     if it is nearer its nearest zoo model than copy_factor x the median same-set run distance,
  average  else if it is that near the head-composition average of the zoo (evaluation/baselines.py),
  new      otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.baselines import head_rows, with_rows


def normalized_distance(layout, a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """RMS of (a - b) / std in the layout's units: a (..., P), b (..., P) of k classes -> (...)."""
    return (layout.normalize(a, k) - layout.normalize(b, k)).pow(2).mean(-1).sqrt()


def aligned(layout, params: torch.Tensor, model_ids: list[int], class_ids: list[int]) -> torch.Tensor:
    """A zoo model's body and its head rows of `class_ids` in that order (every id must be among model_ids)."""
    pos = {int(c): j for j, c in enumerate(model_ids)}
    return with_rows(layout, params[: layout.body_size], head_rows(layout, params)[[pos[int(c)] for c in class_ids]])


class NearestZoo:
    """Nearest training model in weight space for query models, over the zoo streamed in chunks.

    queries: (class_ids (k,), flats (S, P) of that task in class order, key of a zoo model to skip or None).
    Keeps, per query model, the best distance, the zoo key and the aligned zoo model: never the zoo.
    """

    def __init__(self, layout, queries: list[tuple[list[int], torch.Tensor, str | None]]):
        self.layout = layout
        self.queries = [(list(map(int, ids)), layout.normalize(f.float(), len(ids)), skip) for ids, f, skip in queries]
        self.best = [{"distance": torch.full((len(f),), float("inf")), "key": [None] * len(f), "flat": [None] * len(f)}
                     for _, f, _ in self.queries]

    def add(self, models: list[dict]) -> None:
        layout, Pb = self.layout, self.layout.body_size
        if not models or not self.queries:
            return
        V = 1 + max(max(int(c) for m in models for c in m["class_ids"]), max(max(ids) for ids, _, _ in self.queries))
        present = torch.zeros(len(models), V, dtype=torch.bool)  # (M, V)
        rows = torch.zeros(len(models), V, layout.head_dim)  # (M, V, D+1) normalised rows by class id
        bodies = torch.zeros(len(models), Pb)  # (M, P_body) normalised
        for r, m in enumerate(models):
            k = len(m["class_ids"])
            z = layout.normalize(m["params"].float(), k)
            ids = torch.as_tensor(m["class_ids"], dtype=torch.long)
            present[r, ids], rows[r, ids], bodies[r] = True, head_rows(layout, z), z[:Pb]
        keys = [m["key"] for m in models]
        for q, (ids, g, skip) in enumerate(self.queries):
            cand = present[:, ids].all(1)  # (M,) models holding every task class
            if skip is not None and skip in keys:
                cand[keys.index(skip)] = False
            if not cand.any():
                continue
            c = cand.nonzero().squeeze(1)  # (M',)
            zb, zr = bodies[c], rows[c][:, ids].reshape(len(c), -1)  # (M', P_body), (M', k (D+1))
            d2 = torch.cdist(g[:, :Pb], zb).pow(2) if Pb else 0.0  # (S, M')
            d = ((d2 + torch.cdist(g[:, Pb:], zr).pow(2)) / g.shape[1]).sqrt()  # (S, M')
            dist, j = d.min(1)  # (S,)
            best = self.best[q]
            for s in range(len(dist)):
                if dist[s] < best["distance"][s]:
                    m = models[int(c[j[s]])]
                    best["distance"][s] = dist[s]
                    best["key"][s] = m["key"]
                    best["flat"][s] = aligned(layout, m["params"], m["class_ids"], ids)


class SameSetRuns:
    """Pairs of training runs of the same class set, rows aligned (the reference: how far apart two real
    fine-tunings of one task are). Holds the first run of each class set until `pairs` pairs are found."""

    def __init__(self, layout, pairs: int = 30):
        self.layout, self.max_pairs = layout, pairs
        self.first: dict[tuple, tuple[str, torch.Tensor]] = {}
        self.pairs: list[dict] = []

    def add(self, models: list[dict]) -> None:
        for m in models:
            if len(self.pairs) >= self.max_pairs:
                self.first.clear()
                return
            ids = tuple(sorted(int(c) for c in m["class_ids"]))
            flat = aligned(self.layout, m["params"], m["class_ids"], list(ids))
            if ids not in self.first:
                self.first[ids] = (m["key"], flat)
                continue
            key, other = self.first.pop(ids)  # each run in at most one pair
            self.pairs.append({"class_ids": list(ids), "keys": [key, m["key"]], "flats": torch.stack([other, flat]),
                               "distance": float(normalized_distance(self.layout, other, flat, len(ids)))})


def classify(d_nearest: float | None, d_average: float | None, d_reference: float | None, factor: float) -> str:
    """copy / average / new (see the module docstring); unknown without a reference distance. d_nearest is
    None when no training model holds every class of the task (then it cannot be a copy)."""
    if d_reference is None or not np.isfinite(d_reference):
        return "unknown"
    if d_nearest is not None and d_nearest < factor * d_reference:
        return "copy"
    if d_average is not None and d_average < factor * d_reference:
        return "average"
    return "new"


def _median(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None


def summarize(records: list[dict], reference_pairs: list[dict], factor: float) -> dict:
    """Per split: medians of the distances and agreements, the reference, and copy / average / new counts.

    records: per generated model {"distance", "agreement", "distance_average", "oracle_distance", "oracle_agreement"}.
    reference_pairs: {"distance", "agreement"} of same-set training runs.
    """
    ref_d = _median([p["distance"] for p in reference_pairs])
    oracle_d = _median([r.get("oracle_distance") for r in records])
    reference = ref_d if ref_d is not None else oracle_d
    kinds = [classify(r["distance"], r.get("distance_average"), reference, factor) for r in records]
    return {
        "models": len(records),
        "generated_nearest_distance": _median([r["distance"] for r in records]),
        "generated_nearest_agreement": _median([r.get("agreement") for r in records]),
        "generated_average_distance": _median([r.get("distance_average") for r in records]),
        "oracle_nearest_distance": oracle_d,
        "oracle_nearest_agreement": _median([r.get("oracle_agreement") for r in records]),
        "same_set_pairs": len(reference_pairs),
        "same_set_distance": ref_d,
        "same_set_agreement": _median([p.get("agreement") for p in reference_pairs]),
        "reference": "same-set training runs" if ref_d is not None else ("oracle vs its nearest other training model"
                                                                         if oracle_d is not None else None),
        "copy_factor": factor,
        "counts": {kind: kinds.count(kind) for kind in ("copy", "average", "new", "unknown") if kinds.count(kind)},
        "verdict": max(set(kinds), key=kinds.count) if kinds else None,
    }
