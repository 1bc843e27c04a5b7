"""Grouped execution of a target: G models of one architecture run as ONE ordinary network whose
channels are the G models' channels side by side, differentiated by plain autograd.

Layout: a model's activation (B, C, ...) becomes channels [g*C, (g+1)*C) of a (B, G*C, ...) tensor
(channels-last for images, the layout oneDNN's convolutions want). In that layout
  a Conv2d is one grouped convolution over G models (groups = G x its own groups),
  a Linear on (B, G*D) is one batched matmul over the models,
  per-channel ops (ReLU, pooling, eval-mode BatchNorm, ...) and flatten(1) need no change
(flattening (B, G*C, H, W) gives each model's own flattened features, model after model).
Under torch.func.vmap the same network ran ~2x slower on a CPU: its batching rules hand pooling and
ReLU backward tensors in layouts that take oneDNN's and TensorIterator's slow paths.

The target's forward is traced with torch.fx and every node checked against the ops above; a
target with anything else (a channel concat, a view, a generated buffer) raises `Unsupported`, and
stack.FuncStack falls back to vmap. FuncStack also compares this network's logits with vmap's once
per head size before using it, so a transform that traced but computes something else never trains.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

# Modules and functions that act on each channel (or each element) alone, so they run unchanged on
# the grouped layout. Pooling is per channel; dropout is the identity in eval mode (the templates are eval).
_PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout,
)  # fmt: skip
_PER_CHANNEL_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.elu, torch.sigmoid, torch.tanh,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
}  # fmt: skip
_PER_CHANNEL_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}


class Unsupported(Exception):
    """The target uses an op the grouped layout does not cover (FuncStack then uses vmap)."""


def _flatten_from_1(args: tuple, kwargs: dict) -> bool:
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _is(node: fx.Node, functions: set, methods: set, modules: tuple, root: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_module" and isinstance(root.get_submodule(node.target), modules)


def _pool_before_relu(graph: fx.Graph) -> None:
    """Rewrite max_pool(relu(x)) as relu(max_pool(x)): the same values and gradients (ReLU is monotonic, so
    the pool picks the same element and ReLU passes or zeroes it alike), with ReLU and its backward on a
    tensor 4x smaller. ReLU and its backward were ~20% of a cnn-33k step."""
    root = graph.owning_module
    for relu in list(graph.nodes):
        if not _is(relu, {F.relu, torch.relu}, {"relu"}, (nn.ReLU,), root) or len(relu.users) != 1:
            continue
        pool = next(iter(relu.users))
        if not _is(pool, {F.max_pool2d}, set(), (nn.MaxPool2d,), root) or pool.args[0] is not relu:
            continue
        if pool.kwargs.get("return_indices") or (pool.op == "call_module" and root.get_submodule(pool.target).return_indices):
            continue
        if len(relu.args) != 1:  # F.relu(x, True): in place
            continue
        for user in list(pool.users):
            user.replace_input_with(pool, relu)
        pool.replace_input_with(relu, relu.args[0])
        relu.replace_input_with(relu.args[0], pool)
        pool.append(relu)  # relu now runs after the pool
    graph.lint()


class GroupedNet:
    """One target module (a template: its shapes, hyperparameters and frozen tensors) run for G models
    at once in the grouped layout. `generated(name)` says which parameters come stacked, (G, ...)."""

    def __init__(self, module: nn.Module, graph: fx.Graph, generated):
        """`graph`: trace(any module of this architecture): the head size does not change it."""
        self.module = module
        self.generated = generated
        self.graph = graph
        self.modules = dict(module.named_modules())
        for node in self.graph.nodes:
            self._check(node)

    @staticmethod
    def trace(module: nn.Module) -> fx.Graph:
        """The module's forward as an fx graph. Not thread-safe: while it runs, torch.fx patches
        nn.Module.__call__ for the whole process, so trace before worker threads run modules."""
        try:
            graph = fx.symbolic_trace(module).graph
        except Exception as e:  # data-dependent control flow and the like
            raise Unsupported(f"torch.fx cannot trace it: {e}") from e
        _pool_before_relu(graph)
        return graph

    # -- static check: every node is one the grouped layout covers --

    def _check(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "output"):
            return
        if node.op == "get_attr":
            if self.generated(node.target):
                raise Unsupported(f"{node.target} is generated but read directly")
            return
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                raise Unsupported(f"{node.target}: padding_mode {m.padding_mode}")
            if isinstance(m, nn.BatchNorm2d) and (m.training or not m.track_running_stats):
                raise Unsupported(f"{node.target}: BatchNorm with batch statistics")
            if isinstance(m, nn.Flatten) and not (m.start_dim == 1 and m.end_dim == -1):
                raise Unsupported(f"{node.target}: flatten must start at dim 1")
            if not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Flatten, *_PER_CHANNEL_MODULES)):
                raise Unsupported(f"{node.target}: {type(m).__name__}")
            return
        if node.op == "call_function":
            if node.target in _PER_CHANNEL_FUNCTIONS or node.target in _BINARY:
                return
            if node.target is torch.flatten and _flatten_from_1(node.args, node.kwargs):
                return
        if node.op == "call_method":
            if node.target in _PER_CHANNEL_METHODS:
                return
            if node.target == "flatten" and _flatten_from_1(node.args, node.kwargs):
                return
        raise Unsupported(f"{node.op} {getattr(node.target, '__name__', node.target)}")

    # -- execution --

    def _tensor(self, name: str, p: dict, frozen: dict, G: int, stacked: bool) -> torch.Tensor | None:
        """A module's tensor `name` for the G models: generated ones from p (G, ...), frozen ones repeated.
        stacked=True: (G, ...) ; False: models merged into the first dim (G * n, ...)."""
        if name in p:
            t = p[name]
        else:
            t = frozen.get(name)
            if t is None:
                owner, _, attr = name.rpartition(".")
                t = getattr(self.modules[owner], attr)
            if t is None:
                return None
            t = t.detach().expand(G, *t.shape)
        return t if stacked else t.reshape(G * t.shape[1], *t.shape[2:])

    def __call__(self, p: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], x: torch.Tensor,
                 conv_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """p {name: (G, ...)} generated tensors, x (G, B, ...) inputs -> (G, B, K) logits; convolutions in
        conv_dtype (bfloat16: autocast, float32 weights; Linear and BatchNorm stay float32)."""
        G, B = x.shape[:2]
        env: dict[str, object] = {}
        grouped: set[str] = set()  # nodes whose value is in the grouped layout (the rest are constants)

        def val(a):
            return fx.node.map_arg(a, lambda n: env[n.name])

        for node in self.graph.nodes:
            if node.op == "placeholder":
                h = x.transpose(0, 1).reshape(B, G * x.shape[2], *x.shape[3:])  # (B, G*C, ...)
                if h.dim() == 4:
                    h = h.contiguous(memory_format=torch.channels_last)
                env[node.name] = h
                grouped.add(node.name)
                continue
            if node.op == "output":
                out = env[node.args[0].name]
                if node.args[0].name not in grouped or out.dim() != 2:
                    raise Unsupported("the output must be (B, G*K) logits")
                return out.view(B, G, -1).transpose(0, 1)  # (G, B, K)
            if node.op == "get_attr":
                owner, _, attr = node.target.rpartition(".")
                env[node.name] = frozen.get(node.target, getattr(self.modules[owner] if owner else self.module, attr))
                continue
            args, kwargs = val(node.args), val(node.kwargs)
            if not any(a.name in grouped for a in node.all_input_nodes):  # constants only (e.g. arithmetic on buffers)
                env[node.name] = self._eager(node, args, kwargs)
                continue
            grouped.add(node.name)
            if node.op == "call_module":
                env[node.name] = self._module(node.target, args[0], p, frozen, G, conv_dtype)
            elif node.target in _BINARY:
                a, b = (self._broadcast(v, G) if n not in grouped else v for v, n in zip(args[:2], self._names(node.args[:2])))
                env[node.name] = node.target(a, b, *args[2:], **kwargs)
            else:
                env[node.name] = self._eager(node, args, kwargs)
        raise Unsupported("no output")

    def _eager(self, node: fx.Node, args, kwargs):
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    @staticmethod
    def _names(args) -> list[str | None]:
        return [a.name if isinstance(a, fx.Node) else None for a in args]

    @staticmethod
    def _broadcast(c, G: int):
        """A constant beside a grouped tensor: a per-channel tensor ((C, 1, 1) or (1, C, 1, 1)) is repeated
        over the G models along the channel dim; scalars and size-1 channel dims broadcast as they are."""
        if not isinstance(c, torch.Tensor) or c.dim() < 3 or c.shape[-3] == 1:
            return c
        if c.shape[:-3].numel() != 1:
            raise Unsupported("a constant with a batch dimension")
        reps = [1] * c.dim()
        reps[-3] = G
        return c.repeat(*reps)

    def _module(self, name: str, h: torch.Tensor, p: dict, frozen: dict, G: int, conv_dtype: torch.dtype) -> torch.Tensor:
        m = self.modules[name]
        if isinstance(m, nn.Conv2d):
            w = self._tensor(f"{name}.weight", p, frozen, G, stacked=False)  # (G*Co, Ci/g, kh, kw)
            b = self._tensor(f"{name}.bias", p, frozen, G, stacked=False) if m.bias is not None else None
            with torch.autocast(h.device.type, conv_dtype, enabled=conv_dtype != torch.float32):
                return F.conv2d(h, w, b, m.stride, m.padding, m.dilation, m.groups * G)  # (B, G*Co, H', W')
        if isinstance(m, nn.Linear):
            if h.dim() != 2:
                raise Unsupported(f"{name}: Linear over a {h.dim()}-d input")
            w = self._tensor(f"{name}.weight", p, frozen, G, stacked=True)  # (G, out, in)
            hg = h.float().view(h.shape[0], G, -1).transpose(0, 1)  # (G, B, in)
            if m.bias is not None:
                b = self._tensor(f"{name}.bias", p, frozen, G, stacked=True)  # (G, out)
                out = torch.baddbmm(b[:, None, :], hg, w.transpose(1, 2))  # (G, B, out)
            else:
                out = torch.bmm(hg, w.transpose(1, 2))
            return out.transpose(0, 1).reshape(h.shape[0], -1)  # (B, G*out)
        if isinstance(m, nn.BatchNorm2d):  # eval mode: a per-channel affine map from running statistics
            t = {a: self._tensor(f"{name}.{a}", p, frozen, G, stacked=False)
                 for a in ("running_mean", "running_var", "weight", "bias")}  # fmt: skip
            return F.batch_norm(h.float(), t["running_mean"], t["running_var"], t["weight"], t["bias"], False, 0.0, m.eps)
        # forward, not __call__: a torch.fx trace on another thread patches nn.Module.__call__ while it runs.
        return m.forward(h)  # per channel, or flatten(1)
