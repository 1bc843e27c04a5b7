"""cnn-5k's fast path: G cnn-5k models trained together with a hand-written backward pass.

Kept because benchmarks/zoo_throughput.py measures it faster than the generic trainer (zoo_builder/stack.py)
on this CPU, side by side in one run, by more than the 1.3x that justifies its code: 1.64x in session 11
(2,151 vs 1,314 models/min; docs/results/zoo_throughput_ceiling.json), 1.76x in session 10 (README, "Targets").

cnn-5k: conv1 + max-pool are fused: each pooled pixel's 4x4 input window times a block weight
(16C, 4 positions x 8 channels) gives the 4 conv outputs the pool takes the max of, so conv1 is one
well-shaped product per pooled pixel and the pre-pool activations are never needed whole. Two paths
(StackedCNN5k.conv_impl):
  * grouped (CPU default): conv2 and conv3 are one grouped convolution over all models of a call
    (model g = channel group g, channels-last; oneDNN's direct convolution, forward and backward
    called directly, no autograd graph). Everything else runs in the fused C kernels of
    zoo_builder/kernels/kernels.c (or their torch twins where no C compiler is present): conv1 + pool + ReLU
    read straight from the uint8 images, conv1's weight gradient, pool + ReLU and their backward with
    the conv biases' gradients, the head and its loss, and in float32 conv2's input gradient. On a
    CPU core this is 2.2x (float32) and 2.1x (bf16) faster per model-step than the same path in torch
    ops, and 3.0x / 3.2x faster than bmm.
  * bmm (GPU default): im2col + `torch.bmm` with the model dimension as the bmm batch, channels-last,
    hand-written backward. Why not autograd: these layers are tiny (8-24 channels), so time goes to
    memory traffic and per-op overhead; ReLU is applied after pooling (max and ReLU commute), and input
    gradients skip col2im: one matmul over x-gathered output gradients gives the three row partial
    sums, then three row-shifted adds (_conv3_input_grad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tina.errors import TinaError
from tina.targets import CNN5kBody
from zoo_builder import kernels
from zoo_builder.kernels import ImageBatch, TorchKernels, grouped_features, head_backward, max4_relu, max4_relu_backward

aten = torch.ops.aten


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
        # The grouped path's kernels: "c" (zoo_builder/kernels/kernels.c), "torch" (their twins), or "auto"
        # (C on a CPU where it compiles). float32 results agree to rounding; see zoo_builder/kernels.
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

    def inputs(self, data, source: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Network inputs for rows idx (G, B) of `source` (data.train or data.eval): normalised images
        (G, B, H, W, C), or on the grouped path an ImageBatch, which the kernels read straight from the
        uint8 pool, normalising as they go (no normalised copy of the batch).
        """
        if self._impl(source.device) != "grouped" or source.dtype != torch.uint8:
            return data.inputs(source, idx)
        return ImageBatch.from_pool(source, idx, data.mean, data.std, dtype)

    def train_inputs(self, data, idx: torch.Tensor):
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


