"""Everything but the oneDNN convolutions of batched cnn-5k training on the grouped path
(fit.StackedCNN5k), as fused C kernels on a CPU, with a pure-torch twin of every kernel for GPUs and
machines without a C compiler.

Why C: around the convolutions of a ~5K-parameter CNN, torch ops (max-pool with indices, the scatter
backward into a zero-filled tensor, ReLU masks, layout copies, the 4x larger pre-pool conv1 output, a
dozen tiny ops for the head) cost more than the convolutions themselves; one pass per chain makes a
CPU training step about 2x faster (kernels.c says which chains). Why ctypes and not a torch C++
extension: kernels.c includes no headers beyond libc, so it compiles in under a second with any C
compiler (a torch extension takes ~30 s and needs ninja), and ctypes drops the GIL during each call,
so the zoo builder's worker threads run kernels in parallel.

The shared library is built once per source, compiler flags and CPU (it uses -march=native) into
$TINA_KERNEL_CACHE (default ~/.cache/tina/kernels), written under a temporary name and renamed, with
its sha256 beside it. Loading a library runs its code, so a cached one is used only when the folder
and both files belong to this user and nobody else can write them, and its bytes (read through the
very file descriptor that is then loaded) have the recorded sha256; otherwise it is rebuilt, and a
cache folder that is not private is not used at all (the build goes to a private temporary folder).
TINA_KERNELS=0 turns the C kernels off. If compiling fails, training logs one warning and runs the
torch twins: the same results to float32 rounding, about 2x slower per training step.

Both backends expose the same operations (conv1 and conv1_backward from an ImageBatch, pool_relu,
pool_relu_backward, conv_backward, head); `state` is whatever a backward needs, opaque to callers.
Pooled positions follow max_pool2d's tie rule (first maximum in scan order); outputs where
relu(max) == 0 pass no gradient, like ReLU's backward.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import stat
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tina.errors import TinaError
from tina.targets import CNN5kBody

log = logging.getLogger(__name__)
aten = torch.ops.aten

SOURCE = Path(__file__).with_name("kernels.c")
SOURCES = (SOURCE, SOURCE.with_name("kernels_body.h"))  # what the library is built from (its cache key)
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_C1 = 8  # the conv1 width kernels.c is specialised for
_STACK_FLOATS = 1 << 16  # kernels.c keeps one padded image / the head's weights on the stack: small inputs only


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
        if dtype not in _SUFFIX or c != _C1 or (H + 2) * (W + 2) * C > _STACK_FLOATS:
            return TorchKernels.conv1(x, w1, b1, dtype)
        w1, b1 = (t.to(dtype).float().contiguous() for t in (w1, b1))  # as the compute dtype holds them
        R = B * (H // 2) * (W // 2)
        a = torch.empty(R, G, c, dtype=dtype)
        idx = torch.empty(R, G, c, dtype=torch.uint8)
        self._fn("conv1_fwd", dtype)(*self._args(*self._images(x), w1, b1, a, idx, G, B, H, W, C))
        return a, (idx, x)

    def conv_backward(self, dz, a, k, w, G):
        Ci = k.shape[1]
        if dz.dtype != torch.float32 or Ci != _C1 or (dz.shape[2] + 2) * (dz.shape[3] + 2) * dz.shape[1] // G > _STACK_FLOATS:
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


# ---- building and loading the shared library ----------------------------------------------------

_lock = threading.Lock()
_loaded: dict[str, CKernels | None] = {}


def _cache_dir() -> Path:
    env = os.environ.get("TINA_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tina" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(cc: str, out: Path) -> None:
    """Compile kernels.c into `out` and its sha256 into `out`.sha256, atomically (temporary names in the
    same folder, then renames; the checksum last, so a library without one is never trusted)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True, timeout=120)
        os.chmod(tmp, 0o755)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, out)
        side = _sidecar(out)
        side_tmp = side.with_name(side.name + f".{os.getpid()}.tmp")
        side_tmp.write_text(digest)
        os.replace(side_tmp, side)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sidecar(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else."""
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private_dir(d: Path) -> bool:
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _private(st)


def _open_verified(lib: Path) -> int | None:
    """A file descriptor of the cached library when it and its checksum are private and match; else None."""
    try:
        with open(_sidecar(lib), "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as side:
            if not _private(os.fstat(side.fileno())):
                return None
            expected = side.read(128).decode("ascii", "replace").strip()
        fd = os.open(lib, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    st = os.fstat(fd)
    h = hashlib.sha256()
    if stat.S_ISREG(st.st_mode) and _private(st):
        for block in iter(lambda: os.read(fd, 1 << 20), b""):
            h.update(block)
        if h.hexdigest() == expected:
            return fd
    os.close(fd)
    return None


def _load_verified(cc: str, name: str) -> CKernels:
    """Build if needed, verify, and load: through /proc/self/fd, so the bytes loaded are the bytes checked."""
    folder, scratch = _cache_dir(), None
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private_dir(folder):
        log.warning("kernel cache %s is not private to this user (owner or permissions); building in a private "
                    "temporary folder instead", folder)  # fmt: skip
        folder = scratch = Path(tempfile.mkdtemp(prefix="tina-kernels-"))
    path = folder / name
    try:
        fd = _open_verified(path)
        if fd is None:
            log.info("compiling %s -> %s", SOURCE.name, path)
            _compile(cc, path)
            fd = _open_verified(path)
            if fd is None:
                raise OSError(f"{path} changed between its build and its check")
        try:
            proc = f"/proc/self/fd/{fd}"
            return CKernels(ctypes.CDLL(proc if os.path.exists(proc) else str(path)))
        finally:
            os.close(fd)
    finally:
        if scratch is not None:  # the loaded mapping outlives the file
            shutil.rmtree(scratch, ignore_errors=True)


def load() -> CKernels | None:
    """The compiled kernels (built on first use), or None where they cannot be had (logged once)."""
    if os.environ.get("TINA_KERNELS", "1") == "0":
        return None
    if CNN5kBody.widths[0] != _C1:
        return None
    if "lib" in _loaded:  # called every training step: no lock, no PATH search once decided
        return _loaded["lib"]
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        kernels = None
        if cc is None:
            log.warning("no C compiler (cc, gcc or clang) found: batched CPU training uses torch ops (about 2x slower)")
        else:
            key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + " ".join(FLAGS).encode() + cc.encode() + _cpu_id().encode())
            try:
                kernels = _load_verified(cc, f"kernels-{key.hexdigest()[:16]}.so")
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                log.warning("could not build the CPU kernels (%s): batched CPU training uses torch ops (about 2x slower)",
                            detail.strip().splitlines()[-1] if detail.strip() else e)
        _loaded["lib"] = kernels
        return kernels


def backend(device: torch.device, choice: str = "auto"):
    """The kernels for tensors on `device`: "c" (TinaError if unavailable), "torch", or "auto" (C on a CPU when it builds)."""
    if choice not in ("auto", "c", "torch"):
        raise ValueError(f"kernels must be auto, c or torch, got {choice!r}")
    if choice == "torch" or device.type != "cpu":
        if choice == "c":
            raise TinaError(f"the C kernels run on a CPU, not on {device}")
        return TorchKernels
    lib = load()
    if lib is None and choice == "c":
        raise TinaError("the C kernels are unavailable (TINA_KERNELS=0, or no working C compiler; see the log)")
    return lib or TorchKernels
