"""The torch twin of every fused kernel (any device, any dtype), and the pieces both backends share:
the image batch conv1 reads, the head's loss, and conv1 + pool as a block matmul.

Pooled positions follow max_pool2d's tie rule (first maximum in scan order); outputs where
relu(max) == 0 pass no gradient, like ReLU's backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """An NCHW tensor with channels-last memory -> its (N, H, W, C) contiguous view (a copy only if needed)."""
    return t.permute(0, 2, 3, 1).contiguous()


def head_loss(f: torch.Tensor, wh: torch.Tensor, bh: torch.Tensor, y: torch.Tensor, kmask: torch.Tensor):
    """Masked linear head + mean cross-entropy per model. f (G, B, D) -> loss (G,), dlogits (G, B, K)."""
    B = f.shape[1]
    logits = torch.baddbmm(bh[:, None, :], f, wh).masked_fill_(~kmask[:, None, :], float("-inf"))  # (G, B, K)
    logp = torch.log_softmax(logits, -1)
    loss = -logp.gather(2, y[..., None]).squeeze(2).mean(1)  # (G,)
    dl = logp.exp_()  # softmax; exactly 0 on padded classes
    dl.scatter_add_(2, y[..., None], torch.full_like(dl[..., :1], -1.0))
    return loss, dl.div_(B)


def head_backward(f: torch.Tensor, wh: torch.Tensor, bh: torch.Tensor, y: torch.Tensor, kmask: torch.Tensor,
                  dtype: torch.dtype):
    """The head and its loss in float32 over features f (G, B, D): loss (G,), the head's gradients
    {"wh", "bh"}, and the loss's gradient w.r.t. f in the convolutions' dtype."""
    loss, dl = head_loss(f, wh, bh, y, kmask)
    g = {"wh": torch.bmm(f.transpose(1, 2), dl), "bh": dl.sum(1)}
    return loss, g, torch.bmm(dl, wh.transpose(1, 2)).to(dtype)


def grouped_features(a3: torch.Tensor, G: int) -> torch.Tensor:
    """The pooled conv3 output of G models in the grouped layout, a3 (B, H3, W3, G*c3), as each
    model's features (G, B, D) in TargetNet's flatten order (c3, H3, W3)."""
    B, H3, W3, GC = a3.shape
    return a3.view(B, H3 * W3, G, GC // G).permute(2, 0, 3, 1).reshape(G, B, -1)


def max4_relu(z: torch.Tensor, b: torch.Tensor, keep: bool = True):
    """conv1's pool: z (..., 4*c), the 4 conv outputs of each pooled pixel -> relu(max over them + b)
    (..., c), with b broadcast to that shape; with `keep`, the state max4_relu_backward needs
    (max_pool2d's tie rule: the first maximum gets the gradient)."""
    c = z.shape[-1] // 4
    if not keep:
        return torch.relu(z.view(*z.shape[:-1], 4, c).amax(-2) + b), None
    zv = z.reshape(-1, 4, 1, c).permute(0, 3, 1, 2)  # (N, c, 4, 1), channels-last
    m, i = aten.max_pool2d_with_indices(zv, [4, 1], [4, 1])
    m = m.view(*z.shape[:-1], c) + b
    return torch.relu(m), (zv, i, m > 0)


def max4_relu_backward(da: torch.Tensor, state):
    """da (..., c) -> the gradient of z (..., 4*c) (only at each window's maximum) and of the pre-ReLU
    sum (..., c), whose sum over pixels is the bias gradient."""
    zv, i, pos = state
    c = da.shape[-1]
    dm = (da * pos).contiguous()
    dz = aten.max_pool2d_with_indices_backward(
        dm.view(-1, 1, 1, c).permute(0, 3, 1, 2), zv, [4, 1], [4, 1], [0, 0], [1, 1], False, i
    )  # (N, c, 4, 1), channels-last
    return dz.permute(0, 2, 3, 1).reshape(*da.shape[:-1], 4 * c), dm


@functools.lru_cache(maxsize=16)
def _normalisation_table(mean: tuple, std: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    # the same float32 ops as FitData.inputs, then rounded to the compute dtype
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=device) for v in (mean, std))
    lut = torch.arange(256, dtype=torch.float32, device=device)[:, None].div(255.0).sub(mean_t).div(std_t)
    return lut.to(dtype).float()


@dataclass
class ImageBatch:
    """conv1's input for G models x B images, left where it lives: rows (G, B) of `images`, either the
    uint8 training/evaluation pool (N, H, W, C), normalised on the fly through `lut` (256, C), each
    byte's value per channel as the compute dtype holds it (in float32), or normalised float32 images
    already rounded to the compute dtype (lut None). No normalised copy of the batch is made."""

    images: torch.Tensor
    rows: torch.Tensor  # (G, B) int64
    lut: torch.Tensor | None

    @staticmethod
    def from_pool(images: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype):
        lut = _normalisation_table(tuple(mean.tolist()), tuple(std.tolist()), dtype, str(images.device))
        return ImageBatch(images, rows, lut)

    @staticmethod
    def from_normalised(x: torch.Tensor, dtype: torch.dtype) -> "ImageBatch":
        """x (G, B, H, W, C) normalised images."""
        G, B = x.shape[:2]
        rows = torch.arange(G * B, device=x.device).view(G, B)
        return ImageBatch(x.reshape(G * B, *x.shape[2:]).to(dtype).float(), rows, None)

    def __getitem__(self, models: slice) -> "ImageBatch":
        return ImageBatch(self.images, self.rows[models], self.lut)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.rows.shape, *self.images.shape[1:])  # (G, B, H, W, C)

    def normalised(self) -> torch.Tensor:
        """The batch as normalised float32 images (G, B, H, W, C) (what the torch twins read)."""
        x = self.images[self.rows]
        return x if self.lut is None else self.lut[x.long(), torch.arange(x.shape[-1], device=x.device)]


class TorchKernels:
    """The kernels as torch ops: any device, any dtype."""

    name = "torch"

    @staticmethod
    def patches4(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x (N, H, W, C) -> (N, H/2, W/2, 16C) in dtype: the 4x4 input window (zero padding 1) of each pooled pixel."""
        x = x.to(dtype)
        N, H, W, C = x.shape
        xp = F.pad(x, (0, 0, 1, 1, 1, 1))
        s = xp.stride()
        win = xp.as_strided((N, H // 2, W // 2, 4, 4 * C), (s[0], 2 * s[1], 2 * s[2], s[1], 1))
        return win.reshape(N, H // 2, W // 2, 16 * C)

    @staticmethod
    def head(a3: torch.Tensor, wh: torch.Tensor, bh: torch.Tensor, y: torch.Tensor, kmask: torch.Tensor):
        """The head and its loss from the pooled conv3 output a3 (B, H3, W3, G*c3) (grouped layout):
        loss (G,), {"wh", "bh"} gradients (float32), and the gradient w.r.t. a3 in its layout and dtype."""
        B, H3, W3, GC = a3.shape
        G = wh.shape[0]
        loss, g, df = head_backward(grouped_features(a3, G).float(), wh, bh, y, kmask, a3.dtype)
        return loss, g, df.view(G, B, GC // G, H3 * W3).permute(1, 3, 0, 2).reshape(B, H3, W3, GC)

    @staticmethod
    def pool_relu(z: torch.Tensor):
        """relu(2x2 max-pool): z (N, H, W, C) -> a (N, H/2, W/2, C), state."""
        zn = z.permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        m, i = aten.max_pool2d_with_indices(zn, [2, 2], [2, 2])
        a = _nhwc(torch.relu(m))
        return a, (zn, i, a)

    @staticmethod
    def pool_relu_backward(da: torch.Tensor, state):
        """da (N, H/2, W/2, C) -> dz (N, H, W, C), and its sum over N, H, W (C,) in float32: the bias
        gradient of the convolution before the pool."""
        zn, i, a = state
        dm = (da * (a > 0)).permute(0, 3, 1, 2)
        dz = _nhwc(aten.max_pool2d_with_indices_backward(dm, zn, [2, 2], [2, 2], [0, 0], [1, 1], False, i))
        return dz, dm.sum((0, 2, 3), dtype=torch.float32)

    @staticmethod
    def conv1(x: ImageBatch, w1: torch.Tensor, b1: torch.Tensor, dtype: torch.dtype):
        """conv1 + 2x2 max-pool + bias + ReLU in dtype: x (G, B images), w1 (G, 3, 3, C, c), b1 (G, c)
        -> a (R, G, c) with R = (B, H/2, W/2): the grouped layout (model g = channels g*c..), state."""
        G, B, H, W, C = x.shape
        c = w1.shape[-1]
        R = B * (H // 2) * (W // 2)
        P = TorchKernels.patches4(x.normalised().reshape(G * B, H, W, C), dtype).view(G, R, 16 * C)
        # One matmul per model gives a window's 4 conv outputs; each model writes its rows of one
        # (R, G, 4c) array, so the pool reads and writes the grouped layout (MKL takes the strided output).
        z = P.new_empty(R, G, 4 * c)
        torch.bmm(P, block_weight(w1.to(dtype)), out=z.transpose(0, 1))
        a, state = max4_relu(z, b1.to(dtype))
        return a, (state, P)

    @staticmethod
    def conv1_backward(da: torch.Tensor, state):
        """conv1's backward from its pooled output: da (R, G, c) -> w1's gradient (G, 3, 3, C, c) and
        b1's (G, c), float32."""
        pool_state, P = state
        dz, dm = max4_relu_backward(da, pool_state)  # (R, G, 4c), (R, G, c)
        return block_weight_grad(P, dz.transpose(0, 1)), dm.sum(0, dtype=torch.float32)

    @staticmethod
    def conv_backward(dz: torch.Tensor, a: torch.Tensor, k: torch.Tensor, w: torch.Tensor, G: int):
        """A grouped 3x3 conv's (padding 1) input and weight gradients (the bias's comes with
        pool_relu_backward), from oneDNN without an autograd graph: dz (B, G*Co, H, W) and a
        (B, G*Ci, H, W) channels-last, k (G*Co, Ci, 3, 3) its weight, w the same as stacked (G, 9*Ci, Co)."""
        da, dk, _ = aten.convolution_backward(dz, a, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], G, [True, True, False])
        return da, dk


# conv1 + 2x2 pool as one matmul per pooled pixel: its 4x4 input window times a block weight whose
# 4 column blocks are the 3x3 kernel placed at the pool's 4 positions (max_pool2d's scan order).
POSITIONS = ((0, 0), (0, 1), (1, 0), (1, 1))


def block_weight(w1: torch.Tensor) -> torch.Tensor:
    """w1 (G, 3, 3, C, c1) -> (G, 16C, 4*c1): a 4x4 window to the 2x2 conv outputs it pools over."""
    G, C, c1 = w1.shape[0], w1.shape[3], w1.shape[4]
    wb = w1.new_zeros(G, 4, 4, C, 4, c1)
    for j, (py, px) in enumerate(POSITIONS):
        wb[:, py : py + 3, px : px + 3, :, j, :] = w1
    return wb.view(G, 16 * C, 4 * c1)


def block_weight_grad(P: torch.Tensor, dZ: torch.Tensor) -> torch.Tensor:
    """P (G, R, 16C) windows, dZ (G, R, 4*c1) the block outputs' gradient -> w1's gradient
    (G, 3, 3, C, c1) in float32: the block weight's gradient, each position's kernel summed back."""
    G, C, c1 = P.shape[0], P.shape[2] // 16, dZ.shape[2] // 4
    dwb = torch.bmm(P.transpose(1, 2), dZ).view(G, 4, 4, C, 4, c1)
    return sum(dwb[:, py : py + 3, px : px + 3, :, j, :].float() for j, (py, px) in enumerate(POSITIONS))
