"""Batched fine-tuning: many personalized models trained together as one computation.

A group of G models is one set of *stacked* parameter tensors with the model dimension first.
Every step each model draws its own class-balanced minibatch from its own classes, and one
forward/backward pass over (G, B, ...) tensors updates all of them; Adam is elementwise, so the
models stay independent (a model's update never depends on another's gradient).

cnn-5k: conv1 + max-pool are fused: each pooled pixel's 4x4 input window times a block weight
(16C, 4 positions x 8 channels) gives the 4 conv outputs the pool takes the max of, so conv1 is one
well-shaped product per pooled pixel and the pre-pool activations are never needed whole. Two paths
(StackedCNN5k.conv_impl):
  * grouped (CPU default): conv2 and conv3 are one grouped convolution over all models of a call
    (model g = channel group g, channels-last; oneDNN's direct convolution, forward and backward
    called directly, no autograd graph). Everything else runs in the fused C kernels of
    zoo_builder/kernels.c (or their torch twins where no C compiler is present): conv1 + pool + ReLU
    read straight from the uint8 images, conv1's weight gradient, pool + ReLU and their backward with
    the conv biases' gradients, the head and its loss, and in float32 conv2's input gradient. On a
    CPU core this is 2.2x (float32) and 2.1x (bf16) faster per model-step than the same path in torch
    ops, and 3.0x / 3.2x faster than bmm.
  * bmm (GPU default): im2col + `torch.bmm` with the model dimension as the bmm batch, channels-last,
    hand-written backward. Why not autograd: these layers are tiny (8-24 channels), so time goes to
    memory traffic and per-op overhead; ReLU is applied after pooling (max and ReLU commute), and input
    gradients skip col2im: one matmul over x-gathered output gradients gives the three row partial
    sums, then three row-shifted adds (_conv3_input_grad).
Every other target (and every head over frozen features) trains through the generic trainer,
zoo_builder/stack.py; StackedTrainer, evaluate and fit_group take either.

Heads of a group are padded to the group's largest k; padded logits are -inf, so padded rows
get exactly zero gradient and stay zero.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tina.errors import TinaError
from tina.schedule import warmup_cosine
from tina.targets import CNN5kBody
from zoo_builder import kernels
from zoo_builder.stack import FuncStack
from zoo_builder.kernels import (ImageBatch, TorchKernels, grouped_features, head_backward, max4_relu,
                                 max4_relu_backward)

log = logging.getLogger(__name__)
aten = torch.ops.aten


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


# ---- stacked cnn-5k ------------------------------------------------------------------------------



def _im2col3(x: torch.Tensor) -> torch.Tensor:
    """x (N, H, W, C) -> (N, H, W, 9C): 3x3 windows with zero padding, (dy, dx, c) order."""
    N, H, W, C = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    s = xp.stride()
    # For a fixed dy the three dx taps are 3C consecutive numbers in memory: copy them as one run.
    return xp.as_strided((N, H, W, 3, 3 * C), (s[0], s[1], s[2], s[1], 1)).reshape(N, H, W, 9 * C)


def _conv3_input_grad(dZ: torch.Tensor, w: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
    """Gradient w.r.t. a 3x3 conv's input: dZ (G, B*H*W, Co), w (G, 9*Cin, Co) -> (G*B, H, W, Cin).

    dA[y, x] = sum_{dy, dx} dZ[y+1-dy, x+1-dx] @ w[dy, dx]^T. Rather than a (rows, 9*Cin) product
    folded back with nine shifted adds (col2im), the x taps are gathered from dZ (3*Co numbers per
    pixel), one matmul yields the three dy partial sums, and three row-shifted adds finish: about
    half the memory traffic.
    """
    G, _, Co = dZ.shape
    Cin = w.shape[1] // 9
    if dZ.dtype != torch.float32:
        # bfloat16: strided adds are slow on CPU but copies are cheap, so gather all nine taps
        # (a full im2col of dZ) and let one matmul with the flipped kernel do the sum.
        wf = w.view(G, 3, 3, Cin, Co).flip(1, 2).transpose(3, 4).reshape(G, 9 * Co, Cin)
        return torch.bmm(_im2col3(dZ.view(G * B, H, W, Co)).view(G, B * H * W, 9 * Co), wf).view(G * B, H, W, Cin)
    d = F.pad(dZ.reshape(G * B, H, W, Co), (0, 0, 1, 1))  # (GB, H, W+2, Co), zero columns
    s = d.stride()
    xcol = d.as_strided((G * B, H, W, 3 * Co), (s[0], s[1], s[2], 1)).reshape(G, B * H * W, 3 * Co)  # dZ[y, x-1+j]
    wt = w.view(G, 3, 3, Cin, Co).flip(2).permute(0, 2, 4, 1, 3).reshape(G, 3 * Co, 3 * Cin)  # (j, o) -> (dy, c)
    t = torch.bmm(xcol, wt).view(G * B, H, W, 3, Cin)  # t[y', x, dy] = sum_j dZ[y', x-1+j] @ w[dy, 2-j]^T
    out = dZ.new_zeros(G * B, H + 2, W, Cin)
    for dy in range(3):
        out[:, dy : dy + H] += t[:, :, :, dy]  # dZ row y' feeds input row y' + dy - 1
    return out[:, 1 : H + 1]


class StackedCNN5k:
    """G cnn-5k models as stacked tensors (channels-last kernel layout) with forward and backward.

    Parameters (a dict): w1 (G, 3, 3, C, c1), b1 (G, c1), w2 (G, 9*c1, c2), b2, w3 (G, 9*c2, c3), b3,
    wh (G, D, K) = head.weight transposed, bh (G, K). Inputs are normalised images (G, B, H, W, C),
    or on the grouped path an ImageBatch (inputs, train_inputs).
    """

    kind = "images"

    def __init__(self, in_channels: int, size: int, compute_dtype: torch.dtype = torch.float32, conv_impl: str = "auto",
                 kernels: str = "auto"):
        if size % 4:
            raise TinaError(f"cnn-5k batched training needs an image size divisible by 4, got {size}")
        if conv_impl not in ("auto", "bmm", "grouped"):
            raise ValueError(f"conv_impl must be auto, bmm or grouped, got {conv_impl!r}")
        self.C, self.size = in_channels, size
        self.c1, self.c2, self.c3 = CNN5kBody.widths
        self.dtype = compute_dtype  # of the convolutions' training forward/backward (see fit_dtype)
        # How the models train (see the module docstring):
        #   bmm      im2col + bmm with a hand-written backward (the GPU path: 47k models/min on an H100);
        #   grouped  grouped oneDNN convolutions + fused kernels: on a CPU core 3.0x (float32) and 3.2x
        #            (bf16) the model-steps per second of bmm.
        # auto: grouped on a CPU, bmm on a GPU (grouped is untimed there).
        self.conv_impl = conv_impl
        # The grouped path's kernels: "c" (zoo_builder/kernels.c), "torch" (their twins), or "auto"
        # (C on a CPU where it compiles). float32 results agree to rounding; see kernels.py.
        self.kernels = kernels

    # -- conversion to and from TargetNet state dicts --

    def pack(self, state_dicts: list[dict[str, torch.Tensor]], k_max: int) -> dict[str, torch.Tensor]:
        """Stack TargetNet state dicts (any k <= k_max); heads are zero-padded to k_max."""

        def conv(name):  # (O, C, 3, 3) -> (3, 3, C, O)
            return torch.stack([sd[f"body.{name}.weight"].permute(2, 3, 1, 0) for sd in state_dicts]).float()

        def bias(name):
            return torch.stack([sd[f"body.{name}.bias"] for sd in state_dicts]).float()

        G, D = len(state_dicts), CNN5kBody.feature_dim(self.size)
        p = {"w1": conv("conv1").contiguous(), "b1": bias("conv1"),
             "w2": conv("conv2").reshape(G, 9 * self.c1, self.c2).contiguous(), "b2": bias("conv2"),
             "w3": conv("conv3").reshape(G, 9 * self.c2, self.c3).contiguous(), "b3": bias("conv3"),
             "wh": torch.zeros(G, D, k_max), "bh": torch.zeros(G, k_max)}  # fmt: skip
        for i, sd in enumerate(state_dicts):
            k = sd["head.weight"].shape[0]
            p["wh"][i, :, :k] = sd["head.weight"].T
            p["bh"][i, :k] = sd["head.bias"]
        return p

    def state_dict(self, p: dict[str, torch.Tensor], i: int, k: int) -> dict[str, torch.Tensor]:
        """Model i of the group as a TargetNet state dict with k classes."""
        C, c1, c2, c3 = self.C, self.c1, self.c2, self.c3

        def conv(w, cin, cout):  # (3, 3, cin, cout) -> (cout, cin, 3, 3)
            return w.reshape(3, 3, cin, cout).permute(3, 2, 0, 1).contiguous()

        return {
            "body.conv1.weight": conv(p["w1"][i], C, c1), "body.conv1.bias": p["b1"][i].clone(),
            "body.conv2.weight": conv(p["w2"][i], c1, c2), "body.conv2.bias": p["b2"][i].clone(),
            "body.conv3.weight": conv(p["w3"][i], c2, c3), "body.conv3.bias": p["b3"][i].clone(),
            "head.weight": p["wh"][i, :, :k].T.contiguous(), "head.bias": p["bh"][i, :k].clone(),
        }  # fmt: skip

    # -- computation --

    def _conv1(self, w1: torch.Tensor, b1: torch.Tensor, x: torch.Tensor, keep: bool):
        """conv1 + 2x2 max-pool + ReLU, x (G, B, H, W, C) -> A1 (G, B*H/2*W/2, c1); with `keep`, what
        _conv1_backward needs. Z1 holds the 4 conv outputs of each pooled pixel; pool = max over them."""
        G, B, H, W, C = x.shape
        R1 = B * (H // 2) * (W // 2)
        P1 = TorchKernels.patches4(x.view(G * B, H, W, C), x.dtype).view(G, R1, 16 * C)
        A1, pool = max4_relu(torch.bmm(P1, kernels.block_weight(w1)), b1[:, None, :], keep)  # (G, R1, c1)
        return A1, ({"P1": P1, "pool1": pool} if keep else {})

    def _conv1_backward(self, dA1: torch.Tensor, s: dict, g: dict) -> None:
        """dA1 (G, R1, c1) -> g["w1"], g["b1"] (float32)."""
        dZ1, dM1 = max4_relu_backward(dA1, s["pool1"])  # (G, R1, 4*c1), (G, R1, c1)
        g["b1"] = dM1.sum(1, dtype=torch.float32)
        g["w1"] = kernels.block_weight_grad(s["P1"], dZ1)

    def _forward(self, p, x, keep: bool):
        """Conv stack in x's dtype (weights are cast to it); features f (G, B, D) in float32."""
        G, B, H, W, C = x.shape
        p = {n: t.to(x.dtype) for n, t in p.items() if n not in ("wh", "bh")}
        c1, c2, c3 = self.c1, self.c2, self.c3
        H1, W1, H2, W2 = H // 2, W // 2, H // 4, W // 4
        s = {}
        A1, s1 = self._conv1(p["w1"], p["b1"], x, keep)  # (G, R1, c1)
        # conv2 + pool
        cols2 = _im2col3(A1.view(G * B, H1, W1, c1)).view(G, B * H1 * W1, 9 * c1)
        Z2 = torch.baddbmm(p["b2"][:, None, :], cols2, p["w2"])  # (G, R1, c2)
        Z2n = Z2.view(G * B, H1, W1, c2).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        if keep:
            M2, I2 = aten.max_pool2d_with_indices(Z2n, [2, 2], [2, 2])
        else:
            M2 = F.max_pool2d(Z2n, 2)
        A2 = torch.relu_(M2.permute(0, 2, 3, 1))  # (GB, H2, W2, c2)
        # conv3 + pool, flattened in TargetNet's (c3, H3, W3) order
        cols3 = _im2col3(A2).view(G, B * H2 * W2, 9 * c2)
        A3 = torch.relu_(torch.baddbmm(p["b3"][:, None, :], cols3, p["w3"]))  # (G, R2, c3)
        A3n = A3.view(G * B, H2, W2, c3).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        if keep:
            M3, I3 = aten.max_pool2d_with_indices(A3n, [2, 2], [2, 2])
        else:
            M3 = F.max_pool2d(A3n, 2)
        f = M3.reshape(G, B, -1).float()  # (G, B, D), D = c3 * H3 * W3
        if keep:
            s.update(s1, w2=p["w2"], w3=p["w3"], cols2=cols2, Z2n=Z2n, I2=I2, A2=A2, cols3=cols3, A3=A3, A3n=A3n, I3=I3, M3shape=M3.shape)
        return f, s

    def logits(self, p: dict[str, torch.Tensor], x) -> torch.Tensor:
        """x: normalised images (G, B, H, W, C) or ImageBatch (inputs) -> logits (G, B, K) (padded classes
        not masked). Always float32: the oracle accuracies a zoo records do not depend on precision."""
        if isinstance(x, ImageBatch):
            A3, _ = self._grouped_forward(p, x, torch.float32, kernels.backend(x.images.device, self.kernels))
            f = grouped_features(A3, x.shape[0])  # (G, B, D)
        else:
            f, _ = self._forward(p, x, keep=False)
        return torch.baddbmm(p["bh"][:, None, :], f, p["wh"])

    def _impl(self, device: torch.device) -> str:
        return self.conv_impl if self.conv_impl != "auto" else ("bmm" if device.type == "cuda" else "grouped")

    def inputs(self, data: "FitData", source: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Network inputs for rows idx (G, B) of `source` (data.train or data.eval): normalised images
        (G, B, H, W, C), or on the grouped path an ImageBatch, which the kernels read straight from the
        uint8 pool, normalising as they go (no normalised copy of the batch).
        """
        if self._impl(source.device) != "grouped" or source.dtype != torch.uint8:
            return data.inputs(source, idx)
        return ImageBatch.from_pool(source, idx, data.mean, data.std, dtype)

    def train_inputs(self, data: "FitData", idx: torch.Tensor):
        """A training batch for loss_and_grads: inputs() of data.train in the training dtype."""
        return self.inputs(data, data.train, idx, self.dtype)

    def loss_and_grads(self, p, x, y, kmask):
        """Mean cross-entropy per model (G,) and the gradient of its sum w.r.t. every stacked tensor.
        x: normalised images (G, B, H, W, C), or ImageBatch from train_inputs."""
        if isinstance(x, ImageBatch) or self._impl(x.device) == "grouped":
            return self._loss_and_grads_grouped(p, x, y, kmask)
        G, B, H, W, C = x.shape
        c1, c2, c3 = self.c1, self.c2, self.c3
        H1, W1, H2, W2 = H // 2, W // 2, H // 4, W // 4
        dt = self.dtype
        f, s = self._forward(p, x.to(dt), keep=True)
        loss, g, df = head_backward(f, p["wh"], p["bh"], y, kmask, dt)
        w2, w3 = s["w2"], s["w3"]  # in the compute dtype, as the forward used them
        dM3 = df.reshape(s["M3shape"])  # (GB, c3, H3, W3)
        dA3 = aten.max_pool2d_with_indices_backward(dM3, s["A3n"], [2, 2], [2, 2], [0, 0], [1, 1], False, s["I3"])
        dZ3 = dA3.permute(0, 2, 3, 1).reshape(G, B * H2 * W2, c3) * (s["A3"] > 0)  # through the ReLU
        g["w3"], g["b3"] = torch.bmm(s["cols3"].transpose(1, 2), dZ3), dZ3.sum(1, dtype=torch.float32)
        dA2 = _conv3_input_grad(dZ3, w3, B, H2, W2)  # (GB, H2, W2, c2)
        dM2 = (dA2 * (s["A2"] > 0)).permute(0, 3, 1, 2)
        dZ2 = aten.max_pool2d_with_indices_backward(dM2, s["Z2n"], [2, 2], [2, 2], [0, 0], [1, 1], False, s["I2"])
        dZ2 = dZ2.permute(0, 2, 3, 1).reshape(G, B * H1 * W1, c2)
        g["w2"], g["b2"] = torch.bmm(s["cols2"].transpose(1, 2), dZ2), dZ2.sum(1, dtype=torch.float32)
        dA1 = _conv3_input_grad(dZ2, w2, B, H1, W1)  # (GB, H1, W1, c1)
        self._conv1_backward(dA1.reshape(G, B * H1 * W1, c1), s, g)
        return loss, {n: t.float() for n, t in g.items()}

    def _grouped_forward(self, p, x, dt: torch.dtype, ops):
        """The grouped path's conv stack in dtype dt: x (ImageBatch or normalised images) -> the pooled
        conv3 output A3 (B, H3, W3, G*c3), and what the backward needs.

        Layout: model g's channels are channel group g of one (B, H, W, G*c) channels-last batch."""
        if not isinstance(x, ImageBatch):
            x = ImageBatch.from_normalised(x, dt)
        G, B, H, W, C = x.shape
        c1, c2 = self.c1, self.c2
        H1, W1 = H // 2, W // 2
        w = {n: t.to(dt) for n, t in p.items() if n not in ("wh", "bh")}
        # conv1 + pool: the 4 conv outputs of each pooled pixel's 4x4 window (see the module docstring)
        A1, s1 = ops.conv1(x, w["w1"], w["b1"], dt)  # (R1, G, c1) = (B, H1, W1, G*c1)
        a1 = A1.view(B, H1, W1, G * c1).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        k2, k3 = _grouped_kernel(w["w2"], c1), _grouped_kernel(w["w3"], c2)  # (G*cout, cin, 3, 3)
        z2 = F.conv2d(a1, k2, w["b2"].reshape(-1), padding=1, groups=G)  # (B, G*c2, H1, W1)
        A2, s2 = ops.pool_relu(z2.permute(0, 2, 3, 1))  # (B, H2, W2, G*c2)
        a2 = A2.permute(0, 3, 1, 2)
        z3 = F.conv2d(a2, k3, w["b3"].reshape(-1), padding=1, groups=G)  # (B, G*c3, H2, W2)
        A3, s3 = ops.pool_relu(z3.permute(0, 2, 3, 1))  # (B, H3, W3, G*c3)
        return A3, {"s1": s1, "a1": a1, "k2": k2, "w2": w["w2"], "s2": s2, "a2": a2, "k3": k3, "w3": w["w3"], "s3": s3}

    def _loss_and_grads_grouped(self, p, x, y, kmask):
        """loss_and_grads with conv2/conv3 as grouped convolutions (see conv_impl) and everything else
        from `kernels` (fused C on a CPU): the same results as bmm up to rounding."""
        G = y.shape[0]
        c1, c2, c3 = self.c1, self.c2, self.c3
        dt, ops = self.dtype, kernels.backend(y.device, self.kernels)
        A3, s = self._grouped_forward(p, x, dt, ops)
        loss, g, dA3 = ops.head(A3, p["wh"], p["bh"], y, kmask)  # dA3 (B, H3, W3, G*c3)
        dz3, db3 = ops.pool_relu_backward(dA3, s["s3"])  # (B, H2, W2, G*c3)
        da2, dk3 = ops.conv_backward(dz3.permute(0, 3, 1, 2), s["a2"], s["k3"], s["w3"], G)
        dz2, db2 = ops.pool_relu_backward(da2.permute(0, 2, 3, 1), s["s2"])  # (B, H1, W1, G*c2)
        da1, dk2 = ops.conv_backward(dz2.permute(0, 3, 1, 2), s["a1"], s["k2"], s["w2"], G)
        g["w1"], g["b1"] = ops.conv1_backward(da1.permute(0, 2, 3, 1).reshape(-1, G, c1), s["s1"])
        g["w2"] = dk2.view(G, c2, c1, 3, 3).permute(0, 3, 4, 2, 1).reshape(G, 9 * c1, c2)
        g["w3"] = dk3.view(G, c3, c2, 3, 3).permute(0, 3, 4, 2, 1).reshape(G, 9 * c2, c3)
        g["b2"], g["b3"] = db2.view(G, c2), db3.view(G, c3)
        return loss, {n: t.float() for n, t in g.items()}


def _grouped_kernel(w: torch.Tensor, cin: int) -> torch.Tensor:
    """Stacked (G, 9*cin, cout) kernels in (dy, dx, cin) order -> a grouped conv weight (G*cout, cin, 3, 3), channels-last."""
    G, cout = w.shape[0], w.shape[2]
    return w.view(G, 3, 3, cin, cout).permute(0, 4, 3, 1, 2).reshape(G * cout, cin, 3, 3).contiguous(memory_format=torch.channels_last)


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
