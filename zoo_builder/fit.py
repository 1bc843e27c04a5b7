"""Batched fine-tuning: many personalized models trained together as one computation.

A group of G models is one set of *stacked* parameter tensors with the model dimension first.
Every step each model draws its own class-balanced minibatch from its own classes, and one
forward/backward pass over (G, B, ...) tensors updates all of them; Adam is elementwise, so the
models stay independent (a model's update never depends on another's gradient).

cnn-5k has a hand-written fast path (zoo_builder/cnn5k_fast.py, StackedCNN5k: fused C kernels on a
CPU, bmm on a GPU); every other target, and every head over frozen features, trains through the
generic trainer (zoo_builder/stack.py). StackedTrainer, evaluate and fit_group take either.

Heads of a group are padded to the group's largest k; padded logits are -inf, so padded rows
get exactly zero gradient and stay zero.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

from tina.schedule import warmup_cosine
from tina.targets import CNN5kBody
from zoo_builder.cnn5k_fast import StackedCNN5k, _conv3_input_grad  # noqa: F401 - fit.StackedCNN5k is the public name
from zoo_builder.stack import FuncStack

log = logging.getLogger(__name__)


def tune_malloc() -> None:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    Every training step allocates the same few MB-sized temporaries; by default glibc serves each
    with a fresh mmap and the kernel zero-fills its pages again (about 10% of a step's time).
    Process-wide and harmless; a no-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest value glibc accepts
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class StackedTrainer:
    """Stacked parameters + one Adam over them. Adam is elementwise, so this equals G separate Adams.

    The forward/backward runs over slices of `models_per_call` models: a slice's temporaries (a few
    MB) stay in cache, while one call over a whole large group would stream hundreds of MB through
    memory and run ~2x slower. Slicing changes nothing numerically: models never interact.
    """

    def __init__(self, net, params: dict[str, torch.Tensor], kmask: torch.Tensor, lr: float, models_per_call: int = 0,
                 head_lr_mult: float = 1.0):
        self.net, self.params, self.kmask = net, params, kmask
        self.G = kmask.shape[0]
        self.per_call = models_per_call or self.G
        for t in params.values():
            t.grad = torch.zeros_like(t)
        is_head = [n in ("wh", "bh") or n.startswith("head.") for n in params]  # fast-path or state-dict names
        head = [t for t, h in zip(params.values(), is_head) if h]
        body = [t for t, h in zip(params.values(), is_head) if not h]
        groups = [{"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult}]
        if body:
            groups.append({"params": body, "lr": lr, "lr_mult": 1.0})
        self.opt = torch.optim.Adam(groups, lr=lr, fused=True)  # one kernel per tensor: ~3x faster than foreach here

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = []
        for lo in range(0, self.G, self.per_call):
            sl = slice(lo, lo + self.per_call)
            p = {name: t[sl] for name, t in self.params.items()}
            loss, grads = self.net.loss_and_grads(p, x[sl], y[sl], self.kmask[sl])
            for name, t in self.params.items():
                t.grad[sl] = grads[name]
            losses.append(loss)
        self.opt.step()
        return torch.cat(losses)


# ---- data: what each model trains and is evaluated on -------------------------------------------


@dataclass
class FitData:
    """Inputs shared by every group: training pool, evaluation subset, and how to make a batch.

    `train` and `eval` hold either uint8 images (N, H, W, C) (cnn-5k) or float features (N, D)
    (+linear). Class c's training examples are train_order[train_start[c] : train_start[c] + train_count[c]];
    likewise for evaluation.
    """

    train: torch.Tensor
    train_order: torch.Tensor  # (N_used,) int64 indices into `train`, grouped by class
    train_start: torch.Tensor  # (num_classes,) int64
    train_count: torch.Tensor  # (num_classes,) int64
    eval: torch.Tensor
    eval_order: torch.Tensor
    eval_start: torch.Tensor
    eval_count: torch.Tensor
    mean: torch.Tensor  # (C,) image normalisation, [0, 1] units (unused for features)
    std: torch.Tensor
    eval_features: torch.Tensor  # (N_eval, D) generic-model features of `eval`: selection accuracy needs no forward pass

    def to(self, device: torch.device | str) -> "FitData":
        """Every tensor on `device` (a GPU build keeps the whole uint8 training set there: 47 MB for Fashion-MNIST)."""
        return FitData(**{f: getattr(self, f).to(device) for f in self.__dataclass_fields__})

    def inputs(self, source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx (G, B) of `source` as network inputs: normalised float (G, B, H, W, C) or features (G, B, D)."""
        x = source[idx]
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0).sub_(self.mean).div_(self.std)
        return x


def class_index(labels: torch.Tensor, num_classes: int, per_class: int, gen: torch.Generator):
    """Examples grouped by class: (order, start, count); at most `per_class` each (0 = all), chosen at random."""
    order, count = [], []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if per_class and len(idx) > per_class:
            idx = idx[torch.randperm(len(idx), generator=gen)[:per_class]].sort().values
        order.append(idx)
        count.append(len(idx))
    count = torch.tensor(count, dtype=torch.long)
    start = torch.cumsum(count, 0) - count
    return torch.cat(order), start, count


def class_tables(tasks: list[list[int]], k_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, k_max) class ids (padded with each task's first class), k (G,), and the (G, k_max) class mask."""
    ids = torch.tensor([t + [t[0]] * (k_max - len(t)) for t in tasks], dtype=torch.long)
    ks = torch.tensor([len(t) for t in tasks], dtype=torch.long)
    kmask = torch.arange(k_max)[None, :] < ks[:, None]
    return ids, ks, kmask


_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """An avalanching 32-bit integer hash of int64 values in [0, 2^32) (C. Wellons' two-round
    "lowbias32" shape). Both multipliers are < 2^31, so int64 products never overflow and the
    result is the same on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def model_keys(seed: int, task_numbers) -> torch.Tensor:
    """One random stream per model, keyed by (seed, task number): (G,) int64 in [0, 2^32)."""
    n = torch.as_tensor(task_numbers, dtype=torch.long) & _MASK32
    return hash32(n ^ int(hash32(torch.tensor(seed & _MASK32)).item()))


def counter_uniform(keys: torch.Tensor, step: int | torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(G, n) uniforms in [0, 1), a pure function of (key, step, stream, column); for a tensor of
    steps (S,), (S, G, n): the same numbers as S separate calls.

    Counter-based rather than a torch.Generator: a model's minibatches depend on its own task and
    seed only, not on which models share its group, how groups are sliced, or the device, so
    group size is a runtime choice (24 on a CPU, thousands on a GPU) that never changes a zoo."""
    step = torch.as_tensor(step, device=keys.device)
    h = hash32(hash32(keys ^ (stream & _MASK32)) ^ (step[..., None] & _MASK32))  # (G,) or (S, G)
    cols = torch.arange(n, device=keys.device)
    u = hash32((h[..., None] + cols) & _MASK32)  # (G, n) or (S, G, n)
    return (u >> 8).float() * (1.0 / (1 << 24))  # 24 bits: exact in float32, always < 1


def sample_batch(data: FitData, ids: torch.Tensor, ks: torch.Tensor, batch: int, keys: torch.Tensor,
                 step: int | torch.Tensor, sampling: str = "balanced"):
    """Minibatch per model: (G, B) training indices and labels (class positions 0..k-1), or (S, G, B)
    for a tensor of steps (S,). Every tensor lives on the data's device; `keys` (G,) from model_keys.

    sampling "balanced": each image's class is uniform over the task's k classes. "proportional":
    uniform over the task's images, so classes come as often as the training set has them. On an
    imbalanced dataset (clip art: 30 to 240 images a class) the generic model learns those class
    priors; balanced fine-tuning replaces them with uniform ones and loses accuracy on a test set
    drawn like the training set."""
    u0, u1 = counter_uniform(keys, step, 0, batch), counter_uniform(keys, step, 1, batch)  # (..., G, B)
    rows = torch.arange(len(ids), device=ids.device)[:, None]
    if sampling == "balanced":
        pos = (u0 * ks[:, None]).long()
        cls = ids[rows, pos]
        j = (u1 * data.train_count[cls]).long()
        return data.train_order[data.train_start[cls] + j], pos
    if sampling != "proportional":
        raise ValueError(f"sampling must be balanced or proportional, got {sampling!r}")
    kmask = torch.arange(ids.shape[1], device=ids.device)[None, :] < ks[:, None]
    counts = data.train_count[ids] * kmask  # (G, k_max)
    ends = torch.cumsum(counts, 1)  # (G, k_max) running totals over the task's classes
    r = (u0 * ends[:, -1:]).long()  # (..., G, B) a slot among the task's images
    lead = r.shape[:-2]
    e = ends.expand(*lead, *ends.shape).contiguous()
    pos = torch.searchsorted(e, r.contiguous(), right=True)  # (..., G, B) class position of each slot
    cls = ids.expand(*lead, *ids.shape).gather(-1, pos)
    j = r - (e.gather(-1, pos) - data.train_count[cls])
    return data.train_order[data.train_start[cls] + j], pos


def minibatches(data: FitData, ids: torch.Tensor, ks: torch.Tensor, batch: int, keys: torch.Tensor, steps: int,
                chunk: int = 50, sampling: str = "balanced"):
    """sample_batch for steps 0..steps-1, yielded one step at a time but computed `chunk` steps per
    call: the ~20 small integer ops of a draw cost as much for 50 steps as for one."""
    for lo in range(0, steps, chunk):
        idx, y = sample_batch(data, ids, ks, batch, keys, torch.arange(lo, min(lo + chunk, steps)), sampling)
        yield from zip(idx, y)


def evaluate(net, p: dict[str, torch.Tensor], source: torch.Tensor, data: FitData, ids: torch.Tensor, ks: torch.Tensor,
             chunk: int, models_per_call: int = 0) -> torch.Tensor:
    """Accuracy (G,) of each model on the evaluation examples of its own classes (argmax over its k).

    `source`: data.eval (images for the net) or data.eval_features (for a FuncStack.head).
    Runs over slices of `models_per_call` models, `chunk` examples per model at a time."""
    G = ids.shape[0]
    per_call = models_per_call or G
    if per_call < G:
        return torch.cat([
            evaluate(net, {n: t[lo : lo + per_call] for n, t in p.items()}, source, data, ids[lo : lo + per_call],
                     ks[lo : lo + per_call], chunk)
            for lo in range(0, G, per_call)
        ])  # fmt: skip
    k_max, dev = ids.shape[1], ids.device
    # Each model's evaluation list: its classes' examples back to back, labelled by position.
    kmask = torch.arange(k_max, device=dev)[None, :] < ks[:, None]
    n = (data.eval_count[ids] * kmask).sum(1)  # (G,)
    L = int(n.max())
    correct = torch.zeros(G, device=dev)
    ends = torch.cumsum(data.eval_count[ids] * kmask, 1)  # (G, k) running totals
    for lo in range(0, L, chunk):
        r = torch.arange(lo, min(lo + chunk, L), device=dev)[None, :].expand(G, -1)  # (G, b) slot numbers
        pos = torch.searchsorted(ends, r.contiguous(), right=True).clamp_max(k_max - 1)  # class position of each slot
        valid = r < n[:, None]
        cls = ids.gather(1, pos)
        offset = r - (ends.gather(1, pos) - data.eval_count[cls])
        idx = data.eval_order[data.eval_start[cls] + offset.clamp(min=0).minimum(data.eval_count[cls] - 1)]
        with torch.no_grad():
            logits = net.logits(p, net.inputs(data, source, idx)).masked_fill_(~kmask[:, None, :], float("-inf"))
        correct += ((logits.argmax(-1) == pos) & valid).sum(1).float()
    return correct / n.clamp_min(1)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to zero. Fresh Adam moments make the first updates
    ~lr * sign(grad) for every weight: warming up keeps them from knocking a trained init off course."""
    return lr * warmup_cosine(step, steps, warmup)


@dataclass
class GroupResult:
    """What one group of fine-tuned models produced, in task order."""

    state_dicts: list[dict[str, torch.Tensor]]
    oracle_acc: list[float]  # after fine-tuning
    selection_acc: list[float]  # generic model restricted to the task's classes, before fine-tuning
    final_loss: list[float]


def selection_state_dicts(generic: dict[str, torch.Tensor], tasks: list[list[int]],
                          proxy: dict[int, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Classifier selection, every task's starting point: the generic body and the generic head's
    rows for the task's classes, in task order. `proxy` maps a class the generic model never saw (a
    strictly held-out class) to the known class whose row stands in for it ("nearest known class")."""
    body = {n: v for n, v in generic.items() if n.startswith("body.")}
    rows = [[(proxy or {}).get(c, c) for c in t] for t in tasks]
    return [dict(body, **{"head.weight": generic["head.weight"][r], "head.bias": generic["head.bias"][r]}) for r in rows]


def fit_group(net, generic: dict[str, torch.Tensor], tasks: list[list[int]], keys: torch.Tensor, data: FitData, cfg,
              models_per_call: int = 0, proxy: dict[int, int] | None = None) -> GroupResult:
    """Initialise each task's model from the generic one (classifier selection), fine-tune all of
    them together for cfg.steps steps, and evaluate before and after.

    `keys` (G,): each model's random stream (model_keys); `cfg`: FinetuneConfig. Runs on the device
    of `data` (FitData.to); `models_per_call` models per forward/backward (0 = the whole group);
    `proxy`: held-out class -> the known class whose generic row initialises it (selection_state_dicts)."""
    dev = data.train.device
    k_max = max(len(t) for t in tasks)
    ids, ks, kmask = (t.to(dev) for t in class_tables(tasks, k_max))
    keys = keys.to(dev)
    init = selection_state_dicts(generic, tasks, proxy)
    params = {n: t.to(dev) for n, t in net.pack(init, k_max).items()}
    # Selection accuracy = the generic model restricted to the task's classes: generic features
    # (computed once for the whole evaluation set) through the selected head rows.
    head = FuncStack.head(data.eval_features.shape[1])
    head_params = {n: t.to(dev) for n, t in head.pack(init, k_max).items()}
    selection = evaluate(head, head_params, data.eval_features, data, ids, ks, cfg.eval_chunk)
    trainer = StackedTrainer(net, params, kmask, cfg.lr, models_per_call, cfg.head_lr_mult)
    loss = torch.zeros(len(tasks))
    for step, (idx, y) in enumerate(minibatches(data, ids, ks, cfg.batch_size, keys, cfg.steps, sampling=cfg.sampling)):
        trainer.set_lr(lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps))
        loss = trainer.step(net.train_inputs(data, idx), y)
    eval_per_call = max(1, models_per_call * cfg.batch_size // cfg.eval_chunk) if models_per_call else 0
    oracle = evaluate(net, params, data.eval, data, ids, ks, cfg.eval_chunk, eval_per_call)
    params = {n: t.cpu() for n, t in params.items()}
    sds = [net.state_dict(params, i, len(t)) for i, t in enumerate(tasks)]
    return GroupResult(sds, oracle.tolist(), selection.tolist(), loss.tolist())


def flops_per_example(target: str, image_channels: int, size: int, k: int, feature_dim: int = 0) -> float:
    """Nominal FLOPs of one forward pass of one example (multiply-add = 2), for throughput reports."""
    if target != "cnn-5k":
        return 2.0 * feature_dim * k
    c1, c2, c3 = CNN5kBody.widths
    hw = size * size
    macs = hw * c1 * 9 * image_channels + hw / 4 * c2 * 9 * c1 + hw / 16 * c3 * 9 * c2 + CNN5kBody.feature_dim(size) * k
    return 2.0 * macs


def training_flops(target: str, image_channels: int, size: int, k: int, feature_dim: int = 0) -> float:
    """Nominal FLOPs of one training example: forward + backward ~ 3x forward."""
    return 3.0 * flops_per_example(target, image_channels, size, k, feature_dim)


__all__ = [
    "StackedCNN5k", "StackedTrainer", "FitData", "GroupResult", "class_index",
    "class_tables", "counter_uniform", "model_keys", "sample_batch", "minibatches", "evaluate", "selection_state_dicts", "fit_group",
    "tune_malloc", "training_flops",
]  # fmt: skip
