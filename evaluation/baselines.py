"""Non-generative baselines as flat parameter vectors in layout order: classifier selection, retrieval by
text, head composition."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tina.anchor import select_classes
from tina.errors import TinaError


def head_rows(layout, flat: torch.Tensor) -> torch.Tensor:
    """(k, D+1) head rows [W_i, b_i] of a flat vector."""
    return flat[layout.body_size :].reshape(-1, layout.head_dim)


def with_rows(layout, body: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """flat = [body | rows]."""
    return torch.cat([body.reshape(-1), rows.reshape(-1)]).float()


def selection_flat(layout, generic: dict[str, torch.Tensor], class_ids: list[int], proxy: dict[int, int] | None = None) -> torch.Tensor:
    """Classifier selection: the generic model's body and the head rows of the task's classes, in task order.
    `proxy` (zoo_builder.build.nearest_known): a strictly held-out class borrows its nearest known class's
    row, as the zoo's fine-tuning started from it (its untrained own row would be noise)."""
    return layout.flatten(select_classes(generic, class_ids, proxy))


class TextRetrieval:
    """Retrieval by text over the whole training zoo, streamed: for each query task (per-class embeddings
    (k, E)) the zoo model with the highest mean over task classes of the best cosine to one of its classes
    (plain-name embeddings); ties go to the closest k, then to the first model in shard order.

    Memory: one embedding per class id seen (the zoo's per-model text keys are class ids) and, per query,
    the best model so far (its key, row map and weights), never the zoo.
    """

    def __init__(self, queries: list[torch.Tensor]):
        self.queries = [F.normalize(q.float(), dim=-1) for q in queries]  # each (k, E)
        self.class_emb: dict[int, torch.Tensor] = {}  # class id -> (E,) unit plain-name embedding
        self.best: list[dict | None] = [None] * len(queries)
        self.models = 0

    def add(self, models: list[dict]) -> None:
        """One chunk of zoo models (dicts of tina.training.data.iter_split)."""
        if not models or not self.queries:
            return
        for m in models:
            for c, e in zip(m["class_ids"], m["emb"][:, 0]):
                self.class_emb.setdefault(int(c), F.normalize(e.float(), dim=-1))
        ids = sorted(self.class_emb)
        col = {c: j for j, c in enumerate(ids)}
        table = torch.stack([self.class_emb[c] for c in ids])  # (V', E)
        J = max(len(m["class_ids"]) for m in models)
        idx = torch.zeros(len(models), J, dtype=torch.long)  # (M, J) column of each model class
        valid = torch.zeros(len(models), J, dtype=torch.bool)
        for r, m in enumerate(models):
            idx[r, : len(m["class_ids"])] = torch.tensor([col[int(c)] for c in m["class_ids"]])
            valid[r, : len(m["class_ids"])] = True
        kj = valid.sum(1)  # (M,)
        for q, query in enumerate(self.queries):
            sims = (query @ table.T)[:, idx]  # (k, M, J)
            top, rows = sims.masked_fill(~valid[None], -2.0).max(dim=2)  # (k, M)
            # Rounding: exact ties fall to the k rule; integer keys compare exactly.
            score = torch.round(top.double().mean(0) * 1e6).long()  # (M,)
            key = score * 1000 - (kj - query.shape[0]).abs()
            j = int(key.argmax())  # the first of equal keys
            if self.best[q] is None or int(key[j]) > self.best[q]["rank"]:
                self.best[q] = {"rank": int(key[j]), "key": models[j]["key"], "score": float(score[j]) / 1e6,
                                "rows": rows[:, j].tolist(), "params": models[j]["params"].clone()}
        self.models += len(models)

    def hit(self, q: int) -> dict:
        """The best model for query q: key, score, rows (rows[i] = its head row serving task class i)."""
        if self.best[q] is None:
            raise TinaError("the retrieval baseline needs a zoo with training models")
        return {n: self.best[q][n] for n in ("key", "score", "rows")}

    def flat(self, layout, q: int) -> torch.Tensor:
        """The retrieved model with its head rows reordered to the task's classes (its body unchanged)."""
        self.hit(q)
        params = self.best[q]["params"]
        return with_rows(layout, params[: layout.body_size], head_rows(layout, params)[self.best[q]["rows"]])


class HeadComposition:
    """Head composition over the whole training zoo, streamed: the head row of class c is the mean of c's
    rows over the zoo models that contain c (the mean of all rows for a class no model contains), put on
    either the zoo's mean body or the generic model's body. Holds running sums only."""

    def __init__(self, layout):
        self.layout = layout
        self.body_sum = torch.zeros(layout.body_size, dtype=torch.float64)
        self.row_sum: dict[int, torch.Tensor] = {}
        self.row_count: dict[int, int] = {}
        self.models = 0

    def add(self, models: list[dict]) -> None:
        for m in models:
            p = m["params"].double()
            self.body_sum += p[: self.layout.body_size]
            for c, row in zip(m["class_ids"], head_rows(self.layout, p)):
                c = int(c)
                self.row_sum[c] = self.row_sum.get(c, 0) + row
                self.row_count[c] = self.row_count.get(c, 0) + 1
            self.models += 1

    @property
    def mean_body(self) -> torch.Tensor:
        if not self.models:
            raise TinaError("the head-composition baselines need a zoo with training models")
        return (self.body_sum / self.models).float()

    def rows(self, class_ids: list[int]) -> torch.Tensor:
        """(k, D+1) composed head rows in task order."""
        if not self.models:
            raise TinaError("the head-composition baselines need a zoo with training models")
        every = sum(self.row_sum.values()) / sum(self.row_count.values())
        return torch.stack([self.row_sum[c] / self.row_count[c] if c in self.row_sum else every for c in class_ids]).float()

    def flat(self, class_ids: list[int], body: torch.Tensor | None = None) -> torch.Tensor:
        """Composed rows on `body` (default: the zoo's mean body)."""
        return with_rows(self.layout, self.mean_body if body is None else body, self.rows(list(class_ids)))
