"""Fashion-MNIST from its IDX files (Debian's `dataset-fashion-mnist`, any folder holding them, or a download)."""

from __future__ import annotations

import gzip
import logging
import os
import struct

import numpy as np

from tina.errors import TinaError
from tina.targets import ImageSpec
from tina.training.datasets.core import ROOT_OPTION, ImageDataset, channel_stats, default_cache_dir
from tina.training.datasets.download import _reachable, _socket_timeout

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist

_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _load_fashion_mnist(root: str | None, download: bool) -> ImageDataset:
    root = root or os.environ.get("TINA_FASHION_MNIST")
    dl_dir = str(default_cache_dir() / "fashion-mnist")  # where a fallback download goes
    # A folder the user named is the only place we look: a typo should fail, not fall back.
    candidates = [root] if root else [FASHION_MNIST_ROOT, dl_dir]
    files = next(filter(None, map(_find_idx_files, candidates)), None)
    if files is None and (download or not root):
        files = _download_fashion_mnist(root or dl_dir)
    if files is None:
        raise TinaError(
            f"Fashion-MNIST not found in {root or FASHION_MNIST_ROOT}: install it with "
            f"`apt-get install dataset-fashion-mnist`, or point {ROOT_OPTION} (or $TINA_FASHION_MNIST) at a folder "
            "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz"
        )
    arrays = {key: _read_idx(path) for key, path in files.items()}
    train_x, test_x = arrays["train_x"][..., None], arrays["test_x"][..., None]  # (N, 28, 28, 1)
    mean, std = channel_stats(train_x)
    return ImageDataset(
        name="fashion-mnist",
        classes=list(FASHION_MNIST_CLASSES),
        train_x=train_x,
        train_y=arrays["train_y"].astype(np.int64),
        test_x=test_x,
        test_y=arrays["test_y"].astype(np.int64),
        image=ImageSpec(1, 28, mean, std, background=0),  # light garments on black
    )


def _find_idx_files(root: str) -> dict[str, str] | None:
    """The four IDX files (gzipped or not) in `root` or torchvision's `root/FashionMNIST/raw`."""
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        found = {}
        for key, stem in _FMNIST_FILES.items():
            for fname in (stem + ".gz", stem):
                if os.path.isfile(os.path.join(folder, fname)):
                    found[key] = os.path.join(folder, fname)
                    break
        if len(found) == len(_FMNIST_FILES):
            return found
    return None


def _read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (the MNIST format): big-endian magic, dims, then raw uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:  # 0x08 = unsigned byte, the only type Fashion-MNIST uses
            raise ValueError(f"not a uint8 IDX file (magic {data[:4].hex()})")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise TinaError(f"cannot read {path}: {e}; delete it and reinstall or re-download the dataset") from e


def _download_fashion_mnist(target: str) -> dict[str, str] | None:
    """Try torchvision's downloader when its mirror answers within seconds; None on any failure."""
    from urllib.parse import urlparse

    from torchvision.datasets import FashionMNIST

    host = urlparse(FashionMNIST.mirrors[0]).hostname
    if not _reachable(host, 80):
        log.info("Fashion-MNIST mirror %s unreachable; not downloading", host)
        return None
    log.info("downloading Fashion-MNIST into %s", target)
    try:
        with _socket_timeout(30):
            FashionMNIST(target, train=True, download=True)
            FashionMNIST(target, train=False, download=True)
    except Exception as e:  # network, disk, checksum: all mean "not available", reported by the caller
        log.warning("Fashion-MNIST download failed: %s", e)
        return None
    return _find_idx_files(target)
