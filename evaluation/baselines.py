"""Non-generative baselines as flat parameter vectors in layout order: classifier selection, retrieval by
text, head composition."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tina.errors import TinaError


def head_rows(layout, flat: torch.Tensor) -> torch.Tensor:
    """(k, D+1) head rows [W_i, b_i] of a flat vector."""
    return flat[layout.body_size :].reshape(-1, layout.head_dim)


def with_rows(layout, body: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """flat = [body | rows]."""
    return torch.cat([body.reshape(-1), rows.reshape(-1)]).float()


def selection_flat(layout, generic: dict[str, torch.Tensor], class_ids: list[int]) -> torch.Tensor:
    """Classifier selection: the generic model's body and the head rows of the task's classes, in task order."""
    ids = torch.as_tensor(list(class_ids), dtype=torch.long)
    state = dict(generic)
    state["head.weight"], state["head.bias"] = generic["head.weight"][ids], generic["head.bias"][ids]
    return layout.flatten(state)


@dataclass
class ZooPool:
    """The training zoo as the retrieval and mean baselines see it (train split only)."""

    keys: list[str]
    class_ids: list[list[int]]
    names_emb: list[torch.Tensor]  # per model (k_j, E), unit rows: plain-name embeddings in head order
    params: list[torch.Tensor]  # per model flat (P_j,)

    @classmethod
    def from_models(cls, models: list[dict]) -> "ZooPool":
        return cls([m["key"] for m in models], [list(m["class_ids"]) for m in models],
                   [F.normalize(m["emb"][:, 0].float(), dim=-1) for m in models], [m["params"] for m in models])

    def __len__(self) -> int:
        return len(self.keys)


def retrieve(pool: ZooPool, query: torch.Tensor) -> dict:
    """Nearest pool model for per-class query embeddings (k, E): its index, score and row map.

    rows[i] = the pool model's head row that serves task class i (its most similar class).
    """
    if not len(pool):
        raise TinaError("the retrieval baseline needs a zoo with training models")
    query = F.normalize(query.float(), dim=-1)
    k = query.shape[0]
    best = None
    for j, emb in enumerate(pool.names_emb):
        sims = query @ emb.T  # (k, k_j)
        top, rows = sims.max(dim=1)
        key = (round(float(top.mean()), 6), -abs(emb.shape[0] - k))  # rounding: exact ties fall to the k rule
        if best is None or key > best[0]:
            best = (key, j, rows)
    (score, _), j, rows = best
    return {"index": j, "key": pool.keys[j], "score": score, "rows": rows.tolist()}


def retrieval_flat(layout, pool: ZooPool, query: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The retrieved model with its head rows reordered to the task's classes."""
    hit = retrieve(pool, query)
    flat = pool.params[hit["index"]]
    rows = head_rows(layout, flat)[hit["rows"]]
    return with_rows(layout, flat[: layout.body_size], rows), hit


def mean_flat(layout, pool: ZooPool, class_ids: list[int]) -> torch.Tensor:
    """Mean body of the pool; per class the mean of its head rows over the pool models that contain it
    (the mean of all head rows for a class no pool model contains)."""
    if not len(pool):
        raise TinaError("the mean baseline needs a zoo with training models")
    body = torch.stack([p[: layout.body_size] for p in pool.params]).mean(0)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for ids, p in zip(pool.class_ids, pool.params):
        for c, row in zip(ids, head_rows(layout, p)):
            sums[c] = sums.get(c, 0) + row
            counts[c] = counts.get(c, 0) + 1
    all_rows = torch.cat([head_rows(layout, p) for p in pool.params]).mean(0)
    rows = torch.stack([sums[c] / counts[c] if c in sums else all_rows for c in class_ids])
    return with_rows(layout, body, rows)


