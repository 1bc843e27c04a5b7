"""ParamLayout: the one place that flattens, unflattens, normalises and tokenizes a target's parameters.

A personalized model's generated parameters are laid out as

    flat = [ body (P_body,) | head rows (k, D+1) ]       head row i = [head.weight[i], head.bias[i]]

so a k-class model has P_body + k*(D+1) numbers and the class dimension stays explicit. Tokens:

    tokens = [ body tokens (T_body, C) | class 0 tokens (m, C) | ... | class k-1 tokens (m, C) ]

Body tokens are chunks of one *segment* (a module's weight and bias together) and never cross a
segment boundary (G.pt's chunk_within_layer); a class's head row is cut into m tokens. Padding is
zero and masked out of the loss. Because every class owns its own tokens, any k works and permuting
the classes permutes the tokens — the generator can be equivariant to class order.

Normalisation: x_norm = (x - mean) / std, with a per-element mean over the zoo and one std per
parameter tensor (per-element std would blow up near-constant weights). Head rows share one set of
statistics across classes, again so that no class position is special.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from tina.errors import TinaError

HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"


@dataclass(frozen=True)
class Segment:
    """A group of parameters tokenized together (one module's weight and bias)."""

    name: str  # module name, e.g. "body.conv1"
    params: tuple[tuple[str, tuple[int, ...]], ...]  # (parameter name, shape) in flat order

    @property
    def size(self) -> int:
        return sum(math.prod(s) for _, s in self.params)


class ParamLayout:
    """Reversible map between a target's state dict, a flat vector and (normalised) tokens."""

    def __init__(self, target: str, token_size: int, segments: list[Segment], feature_dim: int, frozen: list[str]):
        self.target = target
        self.token_size = token_size  # C
        self.segments = list(segments)  # generated body segments, in flat order
        self.feature_dim = feature_dim  # D
        self.frozen = list(frozen)  # state-dict names not generated: frozen backbone parameters and buffers
        self.head_dim = feature_dim + 1  # D+1 numbers per class
        self.body_size = sum(s.size for s in self.segments)  # P_body
        self.tokens_per_class = math.ceil(self.head_dim / token_size)  # m
        self.n_body_tokens = sum(math.ceil(s.size / token_size) for s in self.segments)  # T_body
        self._body_index = self._chunk_index([s.size for s in self.segments], self.body_size)  # (T_body, C)
        self._head_index = self._chunk_index([self.head_dim], self.head_dim)  # (m, C)
        # Normalisation statistics; identity until fit_stats or load_stats.
        self.body_mean = torch.zeros(self.body_size)
        self.body_std = torch.ones(self.body_size)
        self.head_mean = torch.zeros(self.head_dim)
        self.head_std = torch.ones(self.head_dim)

    # ---- construction and identity ------------------------------------------------------------

    @classmethod
    def from_model(cls, net: nn.Module, target: str, token_size: int, is_generated) -> "ParamLayout":
        """Read segments off a TargetNet; `is_generated(name)` picks the generated parameters. Everything
        else in the state dict is frozen: parameters and persistent buffers (BatchNorm running statistics)."""
        groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        params = dict(net.named_parameters())
        frozen = []
        for name, t in net.state_dict().items():
            if name in (HEAD_WEIGHT, HEAD_BIAS):
                continue
            if not is_generated(name):
                frozen.append(name)
                continue
            if name not in params:
                raise TinaError(f"{target}: buffer {name} would be generated; running statistics cannot be")
            groups.setdefault(name.rsplit(".", 1)[0], []).append((name, tuple(t.shape)))
        segments = [Segment(m, tuple(ps)) for m, ps in groups.items()]
        return cls(target, token_size, segments, net.head.in_features, frozen)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "token_size": self.token_size,
            "feature_dim": self.feature_dim,
            "segments": [{"name": s.name, "params": [[n, list(sh)] for n, sh in s.params]} for s in self.segments],
            "frozen": self.frozen,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ParamLayout":
        segs = [Segment(s["name"], tuple((n, tuple(sh)) for n, sh in s["params"])) for s in d["segments"]]
        return cls(d["target"], int(d["token_size"]), segs, int(d["feature_dim"]), list(d.get("frozen", [])))

    @property
    def fingerprint(self) -> str:
        """Hash of the structure (not the statistics): equal fingerprints mean interchangeable vectors."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- sizes --------------------------------------------------------------------------------

    def num_params(self, k: int) -> int:
        return self.body_size + k * self.head_dim

    def num_tokens(self, k: int) -> int:
        return self.n_body_tokens + k * self.tokens_per_class

    def num_classes(self, flat: torch.Tensor) -> int:
        extra = flat.shape[-1] - self.body_size
        if extra <= 0 or extra % self.head_dim:
            raise TinaError(f"a vector of {flat.shape[-1]} numbers does not fit layout {self.fingerprint} ({self.target})")
        return extra // self.head_dim

    # ---- state dict <-> flat ------------------------------------------------------------------

    def flatten(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """Generated parameters of one model -> flat (P,). k is read off the head."""
        body = [state_dict[n].reshape(-1) for s in self.segments for n, _ in s.params]
        rows = torch.cat([state_dict[HEAD_WEIGHT], state_dict[HEAD_BIAS][:, None]], dim=1)  # (k, D+1)
        return torch.cat(body + [rows.reshape(-1)]).float()

    def unflatten(self, flat: torch.Tensor, k: int | None = None) -> dict[str, torch.Tensor]:
        """flat (P,) -> {name: tensor} for the generated parameters (load with strict=False only
        together with the frozen base weights; `build_model` does that)."""
        k = self.num_classes(flat) if k is None else k
        if flat.shape[-1] != self.num_params(k):
            raise TinaError(f"expected {self.num_params(k)} numbers for k={k}, got {flat.shape[-1]}")
        out, i = {}, 0
        for s in self.segments:
            for name, shape in s.params:
                n = math.prod(shape)
                out[name] = flat[i : i + n].reshape(shape)
                i += n
        rows = flat[i:].reshape(k, self.head_dim)
        out[HEAD_WEIGHT], out[HEAD_BIAS] = rows[:, :-1], rows[:, -1]
        return out

    # ---- normalisation ------------------------------------------------------------------------

    def fit_stats(self, flats: list[torch.Tensor]) -> None:
        """Per-element mean and per-tensor std from a zoo (models may have different k)."""
        body = torch.stack([f[: self.body_size] for f in flats]) if self.body_size else torch.zeros(len(flats), 0)
        rows = torch.cat([f[self.body_size :].reshape(-1, self.head_dim) for f in flats])  # (sum k, D+1)
        self.body_mean, self.head_mean = body.mean(0), rows.mean(0)
        self.body_std = torch.empty(self.body_size)
        i = 0
        for s in self.segments:
            for _, shape in s.params:
                n = math.prod(shape)
                self.body_std[i : i + n] = (body[:, i : i + n] - self.body_mean[i : i + n]).std().clamp_min(1e-8)
                i += n
        D = self.feature_dim
        self.head_std = torch.empty(self.head_dim)
        self.head_std[:D] = (rows[:, :D] - self.head_mean[:D]).std().clamp_min(1e-8)
        self.head_std[D] = (rows[:, D] - self.head_mean[D]).std().clamp_min(1e-8) if rows.shape[0] > 1 else 1.0

    def stats(self) -> dict[str, torch.Tensor]:
        return {"body_mean": self.body_mean, "body_std": self.body_std, "head_mean": self.head_mean, "head_std": self.head_std}

    def load_stats(self, stats: dict[str, torch.Tensor]) -> None:
        for key, ref in self.stats().items():
            if stats[key].shape != ref.shape:
                raise TinaError(f"layout statistics {key} have shape {tuple(stats[key].shape)}, expected {tuple(ref.shape)}")
            setattr(self, key, stats[key].float().clone())

    def _affine(self, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.cat([self.body_mean, self.head_mean.repeat(k)]).to(device)
        std = torch.cat([self.body_std, self.head_std.repeat(k)]).to(device)
        return mean, std

    def normalize(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        mean, std = self._affine(k, flat.device)
        return (flat - mean) / std

    def denormalize(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        mean, std = self._affine(k, flat.device)
        return flat * std + mean

    # ---- flat <-> tokens ----------------------------------------------------------------------

    def _chunk_index(self, sizes: list[int], pad: int) -> torch.Tensor:
        """(tokens, C) indices into a vector; each segment starts a new token; `pad` marks padding."""
        C, rows, start = self.token_size, [], 0
        for size in sizes:
            for off in range(0, size, C):
                idx = torch.arange(start + off, start + min(off + C, size))
                rows.append(torch.cat([idx, torch.full((C - len(idx),), pad)]))
            start += size
        return torch.stack(rows) if rows else torch.zeros(0, C, dtype=torch.long)

    def tokenize(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        """flat (..., P) -> tokens (..., T, C), zero padding."""
        lead = flat.shape[:-1]
        body, rows = flat[..., : self.body_size], flat[..., self.body_size :].reshape(*lead, k, self.head_dim)
        zero = flat.new_zeros(*lead, 1)
        body_tok = torch.cat([body, zero], -1)[..., self._body_index.to(flat.device)]  # (..., T_body, C)
        rows = torch.cat([rows, zero[..., None, :].expand(*lead, k, 1)], -1)  # (..., k, D+2)
        head_tok = rows[..., self._head_index.to(flat.device)]  # (..., k, m, C)
        return torch.cat([body_tok, head_tok.reshape(*lead, k * self.tokens_per_class, self.token_size)], -2)

    def detokenize(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """tokens (..., T, C) -> flat (..., P); inverse of tokenize (padding dropped)."""
        lead = tokens.shape[:-2]
        Tb, m, C = self.n_body_tokens, self.tokens_per_class, self.token_size
        body = tokens.new_zeros(*lead, self.body_size + 1)
        bi = self._body_index.to(tokens.device)
        body[..., bi.reshape(-1)] = tokens[..., :Tb, :].reshape(*lead, Tb * C)
        head = tokens[..., Tb : Tb + k * m, :].reshape(*lead, k, m * C)
        hi = self._head_index.to(tokens.device).reshape(-1)
        rows = tokens.new_zeros(*lead, k, self.head_dim + 1)
        rows[..., hi] = head
        return torch.cat([body[..., :-1], rows[..., :-1].reshape(*lead, k * self.head_dim)], -1)

    def token_mask(self, k: int) -> torch.Tensor:
        """(T, C) bool: True where a token element holds a real parameter."""
        body = self._body_index < self.body_size
        head = (self._head_index < self.head_dim).repeat(k, 1)
        return torch.cat([body, head])

    def __repr__(self) -> str:
        return (
            f"ParamLayout({self.target}, P_body={self.body_size}, D+1={self.head_dim}, C={self.token_size}, "
            f"T_body={self.n_body_tokens}, m={self.tokens_per_class}, fp={self.fingerprint})"
        )


def layout_for(target: str, image, token_size: int) -> ParamLayout:
    """The layout of a registered target for a given image spec (k does not change the layout)."""
    from tina.targets import get_target

    spec = get_target(target)
    net = spec.build(2, image)
    return ParamLayout.from_model(net, target, token_size, spec.is_generated)
