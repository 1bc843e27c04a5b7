"""Classifier selection as the origin of generated weights: the generator samples residuals.

Every personalized model in a zoo starts from classifier selection (the generic body and the
generic head rows of the task's classes) and fine-tuning moves it a little. Selection is therefore
known before any generation, and what a task adds is the difference. With an anchor the generator
learns and samples

    residual = flat - origin(classes),     origin = [ generic body | generic head row of each class ]

and the sampled model is origin + residual. The layout's normalisation statistics are fitted on the
residuals, so the diffusion model spends its capacity on the personalization instead of on
re-deriving weights every task shares (with a well-trained generic model the residual is a few
percent of the weights' spread).

A class the vocabulary names exactly gets its own generic row. Any other class (a paraphrase, a
description, an image prompt) gets a soft selection: the generic rows weighted by
softmax(s / temperature), s[v] = the best cosine between the condition and any of class v's prompt
variants (name, templates, descriptions: matching descriptions too picks the right class for 8 of
10 hand-written Fashion-MNIST paraphrases, names alone for 6). Each class's origin row depends only
on that class, so the generator stays equivariant to class order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tina.errors import TinaError
from tina.layout import ParamLayout

DEFAULT_TEMPERATURE = 0.02  # cosine gap 0.1 -> weight ratio e^5: a close paraphrase still picks its class


def select_classes(generic: dict[str, torch.Tensor], class_ids, proxy: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Hard classifier selection on a state dict: the generic model with its head cut to the task's
    classes, in task order. The one copy (the zoo's fine-tuning start, the evaluation baseline and
    `SelectionAnchor.origin`, its flat form, agree). `proxy` maps a class the generic model never saw
    (a strictly held-out class) to the known class whose row stands in for it ("nearest known class")."""
    rows = torch.as_tensor([(proxy or {}).get(int(c), int(c)) for c in class_ids], dtype=torch.long)
    return {**generic, "head.weight": generic["head.weight"][rows], "head.bias": generic["head.bias"][rows]}


def variant_similarity(cond: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(k, V): each condition's best cosine to any prompt variant of each vocabulary class.

    cond (k, E); keys (V, NV, E) or (V, E). The one similarity behind soft selection, checkpoint
    routing and the expected-accuracy features (tina/routing.py, tina/expected.py).
    """
    if keys.ndim == 2:
        keys = keys[:, None]
    return torch.einsum("ke,vne->kvn", F.normalize(cond.float(), dim=-1), F.normalize(keys.float(), dim=-1)).amax(-1)


@dataclass
class SelectionAnchor:
    """The generic model in layout order: body (P_body,) and head rows (V, D+1), vocabulary order;
    keys (V, NV, E): unit text embeddings of each class's prompt variants, for soft selection;
    ids (V,): the dataset class id of each row (a zoo with strictly held-out classes leaves them out
    of the vocabulary, so row v need not be class v; None = row v is class v)."""

    body: torch.Tensor
    rows: torch.Tensor
    keys: torch.Tensor
    temperature: float = DEFAULT_TEMPERATURE
    ids: torch.Tensor | None = None

    def __post_init__(self):
        if self.keys.ndim == 2:  # one key per class
            self.keys = self.keys[:, None]
        self.keys = F.normalize(self.keys.float(), dim=-1)
        if self.ids is not None:
            self.ids = torch.as_tensor(self.ids, dtype=torch.long)
            if self.ids.shape != (self.rows.shape[0],) or len(set(self.ids.tolist())) != len(self.ids) or int(self.ids.min()) < 0:
                raise TinaError(f"the anchor's class ids must be {self.rows.shape[0]} distinct ids >= 0")

    @classmethod
    def from_generic(cls, layout: ParamLayout, generic: dict[str, torch.Tensor], keys: torch.Tensor,
                     temperature: float = DEFAULT_TEMPERATURE, held_out: list[int] = ()) -> "SelectionAnchor":
        """From the generic model's state dict (its head has one row per dataset class); `held_out`
        classes (never trained, never named to the generator) are left out of the vocabulary."""
        flat = layout.flatten(generic)
        V = layout.num_classes(flat)
        if keys.shape[0] != V:
            raise TinaError(f"{keys.shape[0]} classes of prompt embeddings for a generic model with {V} classes")
        rows = flat[layout.body_size :].reshape(V, layout.head_dim)
        if not held_out:
            return cls(flat[: layout.body_size].clone(), rows.clone(), keys, temperature)
        known = torch.tensor([c for c in range(V) if c not in set(int(h) for h in held_out)])
        return cls(flat[: layout.body_size].clone(), rows[known].clone(), keys[known], temperature, ids=known)

    @property
    def num_classes(self) -> int:
        return self.rows.shape[0]

    def origin(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """flat (P,) of classifier selection for dataset class ids (k,), in task order."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if self.ids is not None:  # dataset id -> row; a class outside the vocabulary has no row
            lookup = {int(c): v for v, c in enumerate(self.ids.tolist())}
            missing = [int(c) for c in ids.tolist() if int(c) not in lookup]
            if missing:
                raise TinaError(f"class ids {missing} are not in this anchor's vocabulary")
            ids = torch.tensor([lookup[int(c)] for c in ids.tolist()], dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_classes):
            raise TinaError(f"class ids {ids.tolist()} are outside this anchor's {self.num_classes} classes")
        return torch.cat([self.body, self.rows[ids].reshape(-1)])

    def weights(self, cond: torch.Tensor) -> torch.Tensor:
        """Soft selection (k, V) from per-class conditions (k, E)."""
        return torch.softmax(variant_similarity(cond, self.keys) / self.temperature, dim=-1)

    def soft_origin(self, weights: torch.Tensor) -> torch.Tensor:
        """flat (P,) whose head rows are weight-averaged generic rows: weights (k, V)."""
        return torch.cat([self.body, (weights.to(self.rows) @ self.rows).reshape(-1)])

    # ---- bundle storage (safetensors tensors + JSON settings) ----------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"body": self.body.contiguous(), "rows": self.rows.contiguous(), "keys": self.keys.contiguous()}
        if self.ids is not None:
            out["ids"] = self.ids.contiguous()
        return out

    @classmethod
    def from_tensors(cls, layout: ParamLayout, tensors: dict[str, torch.Tensor], temperature: float) -> "SelectionAnchor":
        body, rows, keys = tensors.get("body"), tensors.get("rows"), tensors.get("keys")
        if body is None or rows is None or keys is None:
            raise TinaError("the checkpoint's anchor is incomplete (needs anchor.body, anchor.rows and anchor.keys)")
        if body.shape != (layout.body_size,) or rows.ndim != 2 or rows.shape[1] != layout.head_dim:
            raise TinaError(f"the checkpoint's anchor has shapes {tuple(body.shape)}, {tuple(rows.shape)}; "
                            f"layout {layout.fingerprint} needs ({layout.body_size},), (V, {layout.head_dim})")  # fmt: skip
        if keys.ndim != 3 or keys.shape[0] != rows.shape[0]:
            raise TinaError(f"the checkpoint's anchor keys have shape {tuple(keys.shape)}, expected ({rows.shape[0]}, variants, E)")
        ids = tensors.get("ids")
        return cls(body.float(), rows.float(), keys.float(), float(temperature), ids=None if ids is None else ids.long())
