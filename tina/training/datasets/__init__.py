"""Image datasets: the pictures whose classifiers Tina learns to generate.

`load_dataset(name)` returns an `ImageDataset`: uint8 (N, H, W, C) arrays, int64 labels,
human-readable class names (the text the generator is conditioned on) and the `ImageSpec` a
target network needs. Everything downstream (zoo_builder, evaluation) sees only this one shape.

Datasets:
  fashion-mnist  the IDX files from Debian's `dataset-fashion-mnist` (or any folder holding them)
  clipart        ~40 classes curated from Debian's `openclipart-png`; rules in `CLIPART_RULES`,
                 the resulting class list in docs/clipart.md. Rendered once to 32x32 and cached.
  cifar10/100    torchvision's layout (ROOT/cifar-100-python), read without unpickling code; md5-checked
                 unless dataset.verify=false (stand-in copies); downloads only when asked to
  imagefolder    any `root/<class folder>/<image>` tree, rendered to DatasetConfig.size/channels and cached

Image files become arrays through tina.images.render only, the same function `tina predict` uses.

Rendered datasets (clipart, imagefolder) are cached as one .npz under `$TINA_CACHE/datasets`
(default `~/.cache/tina/datasets`), keyed by a hash of the rules and the file list.
"""

from __future__ import annotations

import os
from dataclasses import replace

from tina.errors import TinaError
from tina.training.datasets.cifar import _load_cifar
from tina.training.datasets.clipart import (
    CLIPART_BROKEN,
    CLIPART_ROOT,
    CLIPART_RULES,
    ClassRule,
    ClipartCuration,
    ClipartPlan,
    build_clipart,
    plan_clipart,
)
from tina.training.datasets.core import (
    CACHE_FORMAT,
    DATASETS,
    ROOT_OPTION,
    DatasetConfig,
    ImageDataset,
    channel_stats,
    default_cache_dir,
)
from tina.training.datasets.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, _load_fashion_mnist
from tina.training.datasets.imagefolder import _load_imagefolder
from tina.training.datasets.render import group_key, render_frame, split_test

__all__ = [
    "CACHE_FORMAT", "CLIPART_BROKEN", "CLIPART_ROOT", "CLIPART_RULES", "DATASETS", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT", "ROOT_OPTION", "ClassRule", "ClipartCuration", "ClipartPlan", "DatasetConfig",
    "ImageDataset", "build_clipart", "channel_stats", "default_cache_dir", "group_key", "load_dataset",
    "plan_clipart", "render_frame", "split_test",
]  # fmt: skip


def load_dataset(
    spec: str | dict | DatasetConfig, root: str | None = None, *, download: bool = False, cache_dir: str | None = None
) -> ImageDataset:
    """Load a dataset by name, by DatasetConfig or by a zoo's record of one; raises TinaError when missing.

    root: overrides where its files are. download: let torchvision fetch CIFAR / Fashion-MNIST.
    cache_dir: where rendered datasets are cached (default `$TINA_CACHE/datasets`).
    """
    try:
        cfg = DatasetConfig(spec) if isinstance(spec, str) else DatasetConfig.from_record(spec) if isinstance(spec, dict) else spec
    except ValueError as e:
        raise TinaError(str(e)) from None
    root, download = root or cfg.root, download or cfg.download
    if cfg.name == "fashion-mnist":
        return _load_fashion_mnist(root, download)
    if cfg.name == "clipart":
        root = root or os.environ.get("TINA_CLIPART") or CLIPART_ROOT
        return build_clipart(root, cache_dir=cache_dir)
    if cfg.name in ("cifar10", "cifar100"):
        return _load_cifar(cfg.name, root, download, cfg.verify)
    return _load_imagefolder(replace(cfg, root=root), cache_dir)
