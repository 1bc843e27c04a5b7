"""The kernels of kernels.c behind the same interface as twins.TorchKernels: ctypes calls on CPU
tensors in float32 or bfloat16. Shapes or dtypes a kernel is not specialised for go to the torch
twin, so callers never check."""

from __future__ import annotations

import ctypes

import torch

from zoo_builder.kernels.twins import ImageBatch, TorchKernels, _nhwc

aten = torch.ops.aten

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
C1 = 8  # the conv1 width kernels.c is specialised for
_STACK_FLOATS = 1 << 16  # kernels.c keeps one padded image / the head's weights on the stack: small inputs only


class CKernels:
    """The kernels of kernels.c on CPU tensors in float32 or bfloat16 (other dtypes: TorchKernels)."""

    name = "c"

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _fn(self, name: str, dtype: torch.dtype):
        return getattr(self.lib, f"{name}_{_SUFFIX[dtype]}")

    @staticmethod
    def _args(*args):
        """Tensors as data pointers (None as NULL), ints as int64."""
        return [ctypes.c_void_p(None if a is None else a.data_ptr()) if a is None or isinstance(a, torch.Tensor)
                else ctypes.c_int64(a) for a in args]  # fmt: skip

    def head(self, a3, wh, bh, y, kmask):
        if a3.dtype not in _SUFFIX or wh.shape[1] % 8 or 2 * wh.shape[1] * wh.shape[2] > _STACK_FLOATS:
            return TorchKernels.head(a3, wh, bh, y, kmask)
        a3 = a3.contiguous()
        B, H3, W3, GC = a3.shape
        G, D, K = wh.shape
        loss, gwh, gbh = torch.empty(G), torch.empty(G, D, K), torch.empty(G, K)
        da3 = torch.empty_like(a3)
        km = kmask.to(torch.uint8).contiguous()
        self._fn("head", a3.dtype)(*self._args(a3, wh.float().contiguous(), bh.float().contiguous(), y.contiguous(), km,
                                               loss, gwh, gbh, da3, G, B, H3 * W3, GC // G, K))  # fmt: skip
        return loss, {"wh": gwh, "bh": gbh}, da3

    def pool_relu(self, z: torch.Tensor):
        if z.dtype not in _SUFFIX:
            return TorchKernels.pool_relu(z)
        z = z.contiguous()
        N, H, W, C = z.shape
        a = z.new_empty(N, H // 2, W // 2, C)
        idx = torch.empty(N, H // 2, W // 2, C, dtype=torch.uint8)
        self._fn("pool_relu_fwd", z.dtype)(*self._args(z, a, idx, N, H, W, C))
        return a, (idx, H, W)

    def pool_relu_backward(self, da: torch.Tensor, state):
        if not isinstance(state[0], torch.Tensor) or state[0].dtype != torch.uint8:
            return TorchKernels.pool_relu_backward(da, state)
        idx, H, W = state
        da = da.contiguous()
        N, C = da.shape[0], da.shape[3]
        dz = da.new_empty(N, H, W, C)
        db = torch.zeros(C)
        self._fn("pool_relu_bwd", da.dtype)(*self._args(da, idx, dz, db, N, H, W, C))
        return dz, db

    def _images(self, x: ImageBatch):
        """The (u8, f32, rows, lut) arguments of kernels.c's image reader."""
        pool = x.lut is not None
        images = x.images.contiguous() if pool else x.images.float().contiguous()
        return (images if pool else None, None if pool else images, x.rows.reshape(-1).contiguous(),
                x.lut.contiguous() if pool else None)  # fmt: skip

    def conv1(self, x: ImageBatch, w1: torch.Tensor, b1: torch.Tensor, dtype: torch.dtype):
        G, B, H, W, C = x.shape
        c = w1.shape[-1]
        if dtype not in _SUFFIX or c != C1 or (H + 2) * (W + 2) * C > _STACK_FLOATS:
            return TorchKernels.conv1(x, w1, b1, dtype)
        w1, b1 = (t.to(dtype).float().contiguous() for t in (w1, b1))  # as the compute dtype holds them
        R = B * (H // 2) * (W // 2)
        a = torch.empty(R, G, c, dtype=dtype)
        idx = torch.empty(R, G, c, dtype=torch.uint8)
        self._fn("conv1_fwd", dtype)(*self._args(*self._images(x), w1, b1, a, idx, G, B, H, W, C))
        return a, (idx, x)

    def conv_backward(self, dz, a, k, w, G):
        Ci = k.shape[1]
        if dz.dtype != torch.float32 or Ci != C1 or (dz.shape[2] + 2) * (dz.shape[3] + 2) * dz.shape[1] // G > _STACK_FLOATS:
            return TorchKernels.conv_backward(dz, a, k, w, G)
        _, dk, _ = aten.convolution_backward(dz, a, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], G, [False, True, False])
        B, GCo, H, W = dz.shape
        dzc, w = _nhwc(dz), w.float().contiguous()
        da = torch.empty(B, H, W, G * Ci).permute(0, 3, 1, 2)  # channels-last, like oneDNN's
        self.lib.conv_dgrad_f32(*self._args(dzc, w, da, B, H, W, G, GCo // G))
        return da, dk

    def conv1_backward(self, da: torch.Tensor, state):
        if not isinstance(state[1], ImageBatch):  # conv1 fell back to the torch twin
            return TorchKernels.conv1_backward(da, state)
        idx, x = state
        G, B, H, W, C = x.shape
        c = da.shape[2]
        dw, db = torch.empty(G, 3, 3, C, c), torch.empty(G, c)
        self._fn("conv1_bwd", da.dtype)(*self._args(*self._images(x), da.contiguous(), idx, dw, db, G, B, H, W, C))
        return dw, db
