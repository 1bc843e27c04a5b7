"""Batched training of any target: G models of one architecture as stacked tensors, differentiated by
autograd, no model seeing another's data or gradient. Adding a target needs no code here: whatever
`Target.build` returns trains.

Two ways to run a group, chosen per target (and head size) when first used:
  grouped   zoo_builder/grouped.py: the target traced by torch.fx and run as one network whose channels
            are the G models' side by side (a Conv2d becomes one grouped convolution, a Linear one bmm),
            differentiated by plain autograd; ~2x faster than vmap on a CPU. Used when every op of the
            target is one it covers and its logits match vmap's on a random check;
  vmap      torch.func (functional_call + vmap + grad_and_value) of one model's loss: any target.
Each model's loss is its own minibatch's mean cross-entropy over its own k classes; the gradient of
their sum is each model's gradient of its own loss, since no model's loss depends on another's weights.

Heads of a group are padded to the group's largest k; padded logits are -inf, so padded rows get
exactly zero gradient and stay zero (fit.StackedTrainer's Adam is elementwise).

Two kinds of stacks, with the interface fit.StackedTrainer, fit.evaluate and fit.fit_group use
(pack, state_dict, inputs, train_inputs, logits, loss_and_grads):
  images    whole networks (cnn-5k, cnn-33k): inputs are float images in [0, 1], (G, B, C, H, W);
            the model normalises them itself, as a generated model does;
  features  a linear head on a frozen backbone (resnet20+linear, <timm>+linear): inputs are the
            backbone's precomputed features (G, B, D), computed once per zoo.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from tina.targets import ImageSpec, Target, get_target
from zoo_builder.grouped import GroupedNet, Unsupported

log = logging.getLogger(__name__)
HEAD_W, HEAD_B = "head.weight", "head.bias"


class _Head(nn.Module):
    """A linear head under the name TargetNet gives it ("head."), for head-only stacks."""

    def __init__(self, feature_dim: int, k: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, k)

    def forward(self, f):
        return self.head(f)  # (B, k)


# Traced once, at import: tracing is not thread-safe, and fit_group builds a FuncStack.head on worker threads.
# Every head stack shares this graph (neither feature_dim nor k changes it).
_HEAD_GRAPH = GroupedNet.trace(_Head(1, 1))


class _AnyHead(Target):
    """Just a linear head (not registered): FuncStack.head."""

    name = "linear-head"
    generated = ("head.",)


class FuncStack:
    """G models as stacked tensors {state-dict name: (G, ...)}; one template module per head size.

    `dtype` bfloat16: a grouped target's convolutions run in bfloat16 (float32 weights, head, loss and
    Adam), like finetune.precision=bf16 on cnn-5k's fast path; the vmap path is float32 only.
    `grouped` False: always vmap (benchmarks and tests compare the two)."""

    def __init__(self, target: Target | str, image: ImageSpec | None = None, feature_dim: int | None = None,
                 frozen: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32, grouped: bool = True):
        self.target = get_target(target) if isinstance(target, str) else target
        self.image = image
        self.kind = "features" if self.target.head_only else "images"
        if self.kind == "features" and feature_dim is None:
            raise ValueError("a head-only stack needs feature_dim")
        self.feature_dim = feature_dim
        # Non-generated tensors of a whole network, shared by every model; a head-only stack sees features,
        # never the frozen backbone, so it takes none.
        self.frozen = (frozen or {}) if self.kind == "images" else {}
        self._local = threading.local()  # per thread: {k: template module}
        self.dtype = dtype
        self._grouped: dict[int, GroupedNet | None] = {}
        self._graph = None
        if grouped and self.kind == "features":
            self._graph = _HEAD_GRAPH
        elif grouped:
            # Traced here, once (every head size has the same graph), because tracing is not thread-safe (torch.fx
            # patches nn.Module.__call__ process-wide) and fit's worker threads share this stack.
            try:
                self._graph = GroupedNet.trace(self.module(2))
            except Unsupported as e:
                log.info("target %s trains through vmap (%s)", self.target.name, e)

    @classmethod
    def head(cls, feature_dim: int) -> "FuncStack":
        """Linear heads over precomputed features, whatever the target (scores classifier selection)."""
        return cls(_AnyHead(), feature_dim=feature_dim)

    def module(self, k: int) -> nn.Module:
        """This thread's template for head size k. One per thread: functional_call swaps a group's tensors into
        the module while it runs, so fit's worker threads sharing one template computed with each other's
        weights (tests/test_stack.py checks they no longer do)."""
        templates = self._local.__dict__.setdefault("templates", {})
        if k not in templates:
            m = _Head(self.feature_dim, k) if self.kind == "features" else self.target.build(k, self.image)
            templates[k] = m.eval()  # eval: a frozen part's BatchNorm (if any) uses its running statistics
        return templates[k]

    def grouped(self, k: int) -> GroupedNet | None:
        """The grouped network for head size k, or None where the target needs vmap."""
        if k not in self._grouped:
            self._grouped[k] = self._make_grouped(k) if self._graph is not None else None
        return self._grouped[k]

    def _make_grouped(self, k: int) -> GroupedNet | None:
        module = self.module(k)
        is_gen = (lambda n: n in (HEAD_W, HEAD_B)) if self.kind == "features" else self.target.is_generated
        try:
            net = GroupedNet(module, self._graph, is_gen)
            # The check: two random models on three random inputs, grouped against vmap, in float32.
            # Anything the static check let through but the layout gets wrong (or that fails) shows here.
            gen = torch.Generator().manual_seed(0)
            p = {n: t.detach()[None].repeat(2, *[1] * t.dim()) + 0.1 * torch.randn(2, *t.shape, generator=gen)
                 for n, t in module.named_parameters() if is_gen(n)}  # fmt: skip
            shape = (self.feature_dim,) if self.kind == "features" else (self.image.channels, self.image.size, self.image.size)
            x = torch.rand(2, 3, *shape, generator=gen)
            with torch.no_grad():
                ok = torch.allclose(net(p, self.frozen, x), vmap(self._logits_fn(k))(p, x), atol=1e-4, rtol=1e-4)
            if not ok:
                raise ValueError("its logits differ from vmap's")
        except Exception as e:  # noqa: BLE001 - any failure means: use vmap, which handles every target
            log.info("target %s trains through vmap (the grouped layout does not fit: %s)", self.target.name, e)
            if self.dtype != torch.float32:
                log.warning("target %s: the vmap path trains in float32 only", self.target.name)
            return None
        return net

    # -- conversion to and from TargetNet state dicts --

    def pack(self, state_dicts: list[dict[str, torch.Tensor]], k_max: int) -> dict[str, torch.Tensor]:
        """Stack the generated tensors of TargetNet state dicts (any k <= k_max); heads zero-padded to k_max."""
        names = [HEAD_W, HEAD_B] if self.kind == "features" else [
            n for n, _ in self.module(k_max).named_parameters() if self.target.is_generated(n)]
        p = {}
        for n in names:
            if n in (HEAD_W, HEAD_B):
                t = torch.zeros(len(state_dicts), k_max, *state_dicts[0][n].shape[1:])
                for i, sd in enumerate(state_dicts):
                    t[i, : sd[n].shape[0]] = sd[n]
            else:
                t = torch.stack([sd[n] for sd in state_dicts]).float()
            p[n] = t.contiguous()
        return p

    def state_dict(self, p: dict[str, torch.Tensor], i: int, k: int) -> dict[str, torch.Tensor]:
        """Model i of the group: its generated tensors with k classes."""
        return {n: (t[i, :k] if n in (HEAD_W, HEAD_B) else t[i]).clone() for n, t in p.items()}

    # -- data --

    def inputs(self, data, source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx (G, B) of `source` (fit.FitData.train or .eval): images (G, B, C, H, W) in [0, 1], or features (G, B, D)."""
        x = source[idx]
        if x.dtype == torch.uint8:  # (G, B, H, W, C) as stored
            x = x.permute(0, 1, 4, 2, 3).float().div_(255.0)
        return x

    def train_inputs(self, data, idx: torch.Tensor) -> torch.Tensor:
        return self.inputs(data, data.train, idx)

    # -- computation --

    def _logits_fn(self, k: int):
        module = self.module(k)

        def one(p, x):  # one model: p {name: tensor}, x (B, ...) -> (B, k)
            return functional_call(module, (p, self.frozen), (x,))

        return one

    def logits(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(G, B, K) logits, padded classes not masked (always float32 arithmetic: oracle accuracy)."""
        net = self.grouped(p[HEAD_B].shape[1])
        if net is not None:
            return net(p, self.frozen, x)
        return vmap(self._logits_fn(p[HEAD_B].shape[1]))(p, x)

    def loss_and_grads(self, p, x, y, kmask):
        """Mean cross-entropy per model (G,) and each model's gradient of its own loss, stacked."""
        net = self.grouped(kmask.shape[1])
        if net is not None:
            leaves = {n: t.detach().requires_grad_() for n, t in p.items()}
            with torch.enable_grad():
                logits = net(leaves, self.frozen, x, self.dtype).masked_fill(~kmask[:, None, :], float("-inf"))  # (G, B, K)
                G, B, K = logits.shape
                losses = F.cross_entropy(logits.reshape(G * B, K), y.reshape(G * B), reduction="none").view(G, B).mean(1)
                grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
            return losses.detach(), dict(zip(leaves, grads))
        one = self._logits_fn(kmask.shape[1])

        def loss(pi, xi, yi, mi):  # one model's minibatch: xi (B, ...), yi (B,), mi (K,)
            return F.cross_entropy(one(pi, xi).masked_fill(~mi, float("-inf")), yi)

        grads, losses = vmap(grad_and_value(loss))(p, x, y, kmask)
        return losses.detach(), grads
