"""Everything but the oneDNN convolutions of batched cnn-5k training on the grouped path
(cnn5k_fast.StackedCNN5k), as fused C kernels on a CPU, with a pure-torch twin of every kernel for
GPUs and machines without a C compiler.

Why C: around the convolutions of a ~5K-parameter CNN, torch ops (max-pool with indices, the scatter
backward into a zero-filled tensor, ReLU masks, layout copies, the 4x larger pre-pool conv1 output, a
dozen tiny ops for the head) cost more than the convolutions themselves; one pass per chain makes a
CPU training step about 2x faster (kernels.c says which chains). Why ctypes and not a torch C++
extension: kernels.c includes no headers beyond libc, so it compiles in under a second with any C
compiler (a torch extension takes ~30 s and needs ninja), and ctypes drops the GIL during each call,
so the zoo builder's worker threads run kernels in parallel.

  twins.py       the torch twin of every kernel, and what both backends share
  ctypes_ops.py  the C kernels behind the same interface
  library.py     building kernels.c and loading it only after verifying it
  (here)         backend(): which of the two a device gets

Both backends expose the same operations (conv1 and conv1_backward from an ImageBatch, pool_relu,
pool_relu_backward, conv_backward, head); `state` is whatever a backward needs, opaque to callers.
If compiling fails, training logs one warning and runs the torch twins: the same results to float32
rounding, about 2x slower per training step.
"""

from __future__ import annotations

import torch

from tina.errors import TinaError
from zoo_builder.kernels.ctypes_ops import CKernels
from zoo_builder.kernels.library import load
from zoo_builder.kernels.twins import (ImageBatch, TorchKernels, block_weight, block_weight_grad, grouped_features,
                                       head_backward, head_loss, max4_relu, max4_relu_backward)

__all__ = ["CKernels", "ImageBatch", "TorchKernels", "backend", "block_weight", "block_weight_grad", "grouped_features",
           "head_backward", "head_loss", "load", "max4_relu", "max4_relu_backward"]


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
