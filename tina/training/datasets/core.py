"""The one shape every dataset takes (ImageDataset), the `dataset:` config section, and shared helpers."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tina.errors import TinaError
from tina.images import to_float
from tina.targets import ImageSpec

DATASETS = ("fashion-mnist", "clipart", "cifar10", "cifar100", "imagefolder")

# How a user names a dataset's folder, in every command that loads one (error messages say this).
ROOT_OPTION = "dataset.root=PATH (tina zoo build; tina train and tina eval take data_root=PATH)"
CACHE_FORMAT = "tina-rendered/1"  # bump when the .npz layout or the renderer changes


@dataclass
class ImageDataset:
    """A labelled image dataset split into train and test, with everything a target net needs."""

    name: str  # "fashion-mnist", "clipart", "cifar10", "cifar100", "imagefolder"
    classes: list[str]  # human-readable class names; index = label
    train_x: np.ndarray  # uint8 (N, H, W, C)
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray  # uint8 (M, H, W, C)
    test_y: np.ndarray  # int64 (M,)
    image: ImageSpec  # channels, size, mean, std (mean/std of the train set, in [0, 1] units)

    def __post_init__(self):
        k, c, s = len(self.classes), self.image.channels, self.image.size
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (s, s, c):
                raise ValueError(f"{self.name} {split}_x must be uint8 (N, {s}, {s}, {c}), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{self.name} {split}_y must be int64 ({len(x)},), got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= k):
                raise ValueError(f"{self.name} {split}_y has labels outside [0, {k})")

    def __repr__(self) -> str:  # the default would print the arrays
        return (
            f"ImageDataset({self.name!r}, {len(self.classes)} classes, train={len(self.train_y)}, "
            f"test={len(self.test_y)}, image={self.image})"
        )

    def tensors(self, split: str, idx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float (n, C, H, W) in [0, 1] and int64 labels (n,); `idx` selects rows."""
        if split not in ("train", "test"):
            raise TinaError(f"unknown split {split!r}; choose 'train' or 'test'")
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        if idx is not None:
            if isinstance(idx, torch.Tensor):
                idx = idx.cpu().numpy()
            x, y = x[idx], y[idx]
        return to_float(x), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))  # (n, C, H, W), (n,)

    def subset(self, classes: list[int]) -> ImageDataset:
        """Only the given classes, relabelled 0..k-1 in the order given (image spec unchanged)."""
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes) or not all(0 <= c < len(self.classes) for c in classes):
            raise TinaError(f"subset needs distinct class ids in [0, {len(self.classes)}), got {classes}")
        relabel = np.full(len(self.classes), -1, dtype=np.int64)
        relabel[classes] = np.arange(len(classes))
        keep_tr, keep_te = relabel[self.train_y] >= 0, relabel[self.test_y] >= 0
        return replace(
            self,
            classes=[self.classes[c] for c in classes],
            train_x=self.train_x[keep_tr], train_y=relabel[self.train_y[keep_tr]],
            test_x=self.test_x[keep_te], test_y=relabel[self.test_y[keep_te]],
        )  # fmt: skip


@dataclass
class DatasetConfig:
    """Which images a zoo's models are trained on (the `dataset:` section of configs/zoo/*.yaml).

    The zoo records it (manifest.json "dataset"), so training, evaluation and the demo load the same
    images without being told again; `tina train data_root=...` / `tina eval --data-root` only move it.
    """

    name: str = "fashion-mnist"  # one of DATASETS
    root: Optional[str] = None  # where its files are (else $TINA_FASHION_MNIST / $TINA_CLIPART / $TINA_CIFAR / the default)
    download: bool = False  # fetch CIFAR / Fashion-MNIST when missing (needs network)
    # CIFAR: check each file's md5 against the official archive. Set false only for stand-in or
    # subsampled copies; the files are still read without running any code (see _read_cifar_batch).
    verify: bool = True
    # imagefolder only (an error elsewhere): what every image is rendered to, and the split
    size: int = 32  # square side in pixels (cnn-5k needs a multiple of 8)
    channels: int = 3  # 3 = RGB, 1 = grey
    test_fraction: float = 0.2  # share of each class held out as test images (hash of the file name)
    class_names: dict[str, str] = field(default_factory=dict)  # folder name -> the class name the text encoder reads

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"dataset.name must be one of {', '.join(DATASETS)}, got {self.name!r}")
        own = {k: getattr(self, k) for k in _IMAGEFOLDER_KEYS if getattr(self, k) != _IMAGEFOLDER_DEFAULTS[k]}
        if own and self.name != "imagefolder":
            raise ValueError(f"dataset.{', dataset.'.join(own)} apply to dataset.name=imagefolder only")
        if self.channels not in (1, 3) or self.size < 8 or self.size % 8:
            raise ValueError(f"dataset.channels must be 1 or 3 and dataset.size a multiple of 8, got {self.channels}, {self.size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"dataset.test_fraction must be in (0, 1), got {self.test_fraction}")

    def record(self) -> dict:
        """What a zoo stores: every field but `download` (how the files arrived is not what they are)."""
        d = asdict(self)
        d.pop("download")
        return d

    def identity(self) -> dict:
        """The fields that decide the images: name, root and whatever differs from its default, so zoos
        built before the newer fields existed keep their identity."""
        d, default = self.record(), DatasetConfig(self.name).record()
        return {k: v for k, v in d.items() if k in ("name", "root") or v != default[k]}

    @classmethod
    def from_record(cls, d: dict) -> "DatasetConfig":
        """From a zoo's manifest "dataset" entry (which also holds classes and image spec)."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


_IMAGEFOLDER_KEYS = ("size", "channels", "test_fraction", "class_names")
_IMAGEFOLDER_DEFAULTS = {"size": 32, "channels": 3, "test_fraction": 0.2, "class_names": {}}


def default_cache_dir() -> Path:
    """`$TINA_CACHE/datasets`, or `~/.cache/tina/datasets`."""
    base = os.environ.get("TINA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tina")
    return Path(base) / "datasets"


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 (N, H, W, C) images, in [0, 1] units.

    A 256-bin histogram per channel is exact and never materialises a float copy of the data.
    """
    if len(x) == 0:
        raise ValueError("cannot compute image statistics of an empty set")
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[-1]):
        counts = np.bincount(x[..., c].ravel(), minlength=256).astype(np.float64)
        m = (counts * values).sum() / counts.sum()
        mean.append(round(float(m), 4))
        std.append(round(float(np.sqrt((counts * (values - m) ** 2).sum() / counts.sum())), 4))
    return tuple(mean), tuple(std)
