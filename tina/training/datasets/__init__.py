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

import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import pickle  # only through _ArraysOnlyUnpickler, which rebuilds arrays and nothing else
import re
import socket
import struct
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tina.errors import TinaError
from tina.images import DATASET_MAX_PIXELS as MAX_PIXELS
from tina.images import render, to_float
from tina.targets import ImageSpec

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "clipart", "cifar10", "cifar100", "imagefolder")

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
CLIPART_ROOT = "/usr/share/openclipart/png"  # Debian's openclipart-png
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


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


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


@contextmanager
def _socket_timeout(seconds: float):
    """torchvision downloads through urllib without a timeout; a stalled server must not hang us."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reachable(host: str | None, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection opens within `timeout` s. In a daemon thread, because a DNS lookup
    on a machine without network can block far longer than any socket timeout."""
    if not host:
        return False
    opened = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


# ---------------------------------------------------------------------------------------------
# CIFAR


_CIFAR = {  # name -> (torchvision class, folder inside root, labels key, meta names key, archive)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "labels", "label_names",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "fine_labels", "fine_label_names",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}  # fmt: skip


def _load_cifar(name: str, root: str | None, download: bool, verify: bool = True) -> ImageDataset:
    """CIFAR in torchvision's layout (ROOT/cifar-100-python/{train,test,meta}), read by our own safe reader.

    torchvision's loader unpickles the batches (a pickle can run code) and insists on the official md5s;
    here the batches go through `_read_cifar_batch`, which builds only arrays, lists and strings, and
    the md5 check is `verify` (false for stand-in or subsampled copies).
    """
    from torchvision import datasets

    root = root or os.environ.get("TINA_CIFAR") or str(default_cache_dir().parent / "cifar")  # ~/.cache/tina/cifar
    cls_name, folder, label_key, names_key, url = _CIFAR[name]
    tv = getattr(datasets, cls_name)
    if download and not os.path.isdir(os.path.join(root, folder)):
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            with _socket_timeout(60):
                download_and_extract_archive(tv.url, root, filename=tv.filename, md5=tv.tgz_md5)
        except Exception as e:  # network, disk, checksum
            raise TinaError(f"could not download {name} from {url}: {e}") from e
    base = os.path.join(root, folder)
    if not os.path.isdir(base):
        raise TinaError(
            f"{name} not found: extract {url} so that {base} exists (choose the parent folder with "
            f"{ROOT_OPTION} or $TINA_CIFAR), or set dataset.download=true"
        )
    files = {"train": tv.train_list, "test": tv.test_list, "meta": [[tv.meta["filename"], tv.meta["md5"]]]}
    batches = {}
    for split, entries in files.items():
        batches[split] = []
        for fname, md5 in entries:
            path = os.path.join(base, fname)
            if not os.path.isfile(path):
                raise TinaError(f"{name}: {path} is missing; re-extract {url} into {root}")
            if verify and _md5(path) != md5:
                raise TinaError(
                    f"{name}: {path} is not the official file (md5 differs); re-extract {url}, or set "
                    "dataset.verify=false if it is a stand-in or subsampled copy on purpose"
                )
            batches[split].append(_read_cifar_batch(path))

    def arrays(split):
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches[split]])
        y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches[split]])
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y  # (N, 32, 32, 3) HWC

    try:
        names = batches["meta"][0][names_key]  # str in the official Python 2 files, bytes when written by Python 3
        classes = [(c.decode("latin1") if isinstance(c, bytes) else str(c)).replace("_", " ") for c in names]
        (train_x, train_y), (test_x, test_y) = arrays("train"), arrays("test")
    except (KeyError, ValueError, TypeError) as e:
        raise TinaError(f"{name}: {base} does not hold CIFAR batches ({type(e).__name__}: {e})") from None
    mean, std = channel_stats(train_x)
    try:
        return ImageDataset(name=name, classes=classes, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                            image=ImageSpec(3, 32, mean, std))
    except ValueError as e:  # labels outside the class list
        raise TinaError(f"{name}: {base}: {e}") from None


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's Python batches while refusing any global but numpy's array rebuilders.

    A pickle names the callables it runs; CIFAR's name only numpy.ndarray, numpy.dtype and numpy's
    `_reconstruct` (plus `_codecs.encode`, how protocol 2 spells bytes). Anything else is an error,
    so a tampered file cannot execute code.
    """

    def find_class(self, module: str, name: str):
        import codecs

        from numpy.core import multiarray  # numpy 2 maps numpy.core to numpy._core

        allowed = {
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("_codecs", "encode"): codecs.encode,
        }  # fmt: skip
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches hold only arrays and lists")
        return allowed[(module, name)]


def _read_cifar_batch(path: str) -> dict:
    """One CIFAR batch file as a dict with str keys; TinaError when it is not one."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core's alias under numpy 2
            obj = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise TinaError(f"cannot read CIFAR batch {path}: {e}") from None
    if not isinstance(obj, dict):
        raise TinaError(f"{path} is not a CIFAR batch (a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# Rendering many files (tina.images.render is the one decode path; here: pools, progress, failures)


@contextmanager
def _pil_pixel_limit(max_pixels: int):
    """Set PIL's decompression-bomb limit for a block, and keep its warnings quiet below it."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _render_job(job: tuple[str, ImageSpec, int]) -> tuple[np.ndarray | None, str | None]:
    """Worker entry point: (image, None) or (None, reason)."""
    path, frame, max_pixels = job
    try:
        with _pil_pixel_limit(max_pixels):
            return render(path, frame, max_pixels), None
    except Exception as e:  # one bad file must not stop a build of thousands; the caller counts them
        return None, f"{type(e).__name__}: {e}"


def _render_many(paths: list[str], frame: ImageSpec, max_pixels: int, workers: int, desc: str):
    """Render files in a process pool with a progress bar; returns (images, ok mask, failures)."""
    jobs = [(p, frame, max_pixels) for p in paths]
    images = np.full((len(paths), frame.size, frame.size, frame.channels), frame.background, dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    failures: list[tuple[str, str]] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=None)
    if workers > 1 and len(jobs) >= 64:
        # Largest files first, so that a few 170 MP drawings do not end up as one worker's tail.
        order = sorted(range(len(jobs)), key=lambda i: -os.path.getsize(paths[i]))
        # fork (where there is one) starts in milliseconds and needs no `__main__` guard in user
        # scripts; the children only run PIL, so the parent's torch threads do not matter
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            futures = {pool.submit(_render_job, jobs[i]): i for i in order}
            results = ((futures[f], f.result()) for f in as_completed(futures))
            _collect(results, paths, images, ok, failures, bar)
    else:
        _collect(enumerate(map(_render_job, jobs)), paths, images, ok, failures, bar)
    bar.close()
    return images, ok, failures


def _collect(results, paths, images, ok, failures, bar):
    for i, (img, err) in results:
        if img is None:
            failures.append((paths[i], err))
        else:
            images[i], ok[i] = img, True
        bar.update(1)


# ---------------------------------------------------------------------------------------------
# Deterministic split and the rendered-dataset cache


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) from a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def group_key(filename: str) -> str:
    """Files that are renderings of one drawing share a key, so a split never separates them.

    Open Clip Art ships colour and black-and-white twins (`pie_apple`, `pie_apple_bw`) and
    numbered copies (`aiga_bar1`, `aiga_bar_`).
    """
    stem = os.path.splitext(os.path.basename(filename))[0].lower()
    stem = re.sub(r"(^|[_\-])bw(?=[_\-]|$)", "", stem)
    return re.sub(r"(?<=[a-z])1$", "", stem.rstrip("_-"))


def split_test(keys: list[str], labels: np.ndarray, test_fraction: float) -> np.ndarray:
    """Boolean test mask: a file is test when the hash of its group key falls below `test_fraction`.

    Hash-based, so a file's side never depends on which other files exist. A class that ends up
    with no test (or no train) image gets its lowest (or highest) hashed group moved over.
    """
    u = np.array([_unit_hash(k) for k in keys])
    test = u < test_fraction
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        if not test[members].any():
            test[members[u[members] == u[members].min()]] = True
        if test[members].all():
            test[members[u[members] == u[members].max()]] = False
    return test


def _file_fingerprint(paths: list[str], root: str) -> list[list]:
    """Relative path, size and mtime of each file: enough to notice an edited data folder."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.relpath(p, root), st.st_size, int(st.st_mtime)])
    return out


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is as readable as any download
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_npz(path: Path, name: str, frame: ImageSpec) -> ImageDataset | None:
    """An ImageDataset from a cache file, or None when it is missing or unreadable.

    frame: how the cached images were rendered (caches written before ImageSpec had `background` and
    `crop` do not record them; the cache key already pins the renderer's settings)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            ds = ImageDataset(
                name=name,
                classes=[str(c) for c in z["classes"]],
                train_x=z["train_x"], train_y=z["train_y"], test_x=z["test_x"], test_y=z["test_y"],
                image=replace(ImageSpec.from_dict(meta["image"]), background=frame.background, crop=frame.crop),
            )  # fmt: skip
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding", path, e)
        return None
    log.info("loaded %s from cache %s", name, path)
    return ds


def _dataset_from_render(name, classes, images, labels, keys, test_fraction, frame: ImageSpec) -> tuple[ImageDataset, np.ndarray]:
    """Split rendered images by group-key hash and measure the train set; returns (dataset, test mask)."""
    test = split_test(keys, labels, test_fraction)
    train_x = images[~test]
    if len(train_x) == 0:
        raise TinaError(f"{name}: no images left to train on")
    mean, std = channel_stats(train_x)
    ds = ImageDataset(
        name=name,
        classes=list(classes),
        train_x=train_x,
        train_y=labels[~test].astype(np.int64),
        test_x=images[test],
        test_y=labels[test].astype(np.int64),
        image=replace(frame, mean=mean, std=std),
    )
    return ds, test


def render_frame(size: int, channels: int = 3, crop: bool = False) -> ImageSpec:
    """The ImageSpec files are rendered with (white paper); mean and std are measured afterwards."""
    return ImageSpec(channels, size, (0.0,) * channels, (1.0,) * channels, background=255, crop=crop)


def _cache_arrays(ds: ImageDataset, meta: dict) -> dict[str, np.ndarray]:
    meta = {**meta, "format": CACHE_FORMAT, "image": ds.image.to_dict()}
    return {
        "train_x": ds.train_x, "train_y": ds.train_y, "test_x": ds.test_x, "test_y": ds.test_y,
        "classes": np.array(ds.classes, dtype=str), "meta": np.array(json.dumps(meta)),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Clip art: curation rules and build


@dataclass(frozen=True)
class ClassRule:
    """Which Open Clip Art files form (part of) a class. A file takes the first rule it matches.

    A file matches when one of its paths (the file or a symlink to it) lies under one of
    `folders` (anywhere when empty) and not under `exclude_folders`, and its name (no extension,
    searched case-insensitively) matches `keywords` (when set) but not `exclude`.
    """

    name: str  # the human-readable class name; several rules may feed one class
    folders: tuple[str, ...] = ()
    keywords: str | None = None
    exclude: str | None = None
    exclude_folders: tuple[str, ...] = ()

    def matches(self, relpath: str, stem: str) -> bool:
        """`relpath` relative to the clip-art root with '/' separators; `stem` the name without extension."""
        if self.folders and not relpath.startswith(self._prefixes[0]):
            return False
        if self.exclude_folders and relpath.startswith(self._prefixes[1]):
            return False
        keywords, exclude = self._patterns
        return (keywords is None or keywords.search(stem) is not None) and not (exclude and exclude.search(stem))

    @cached_property
    def _prefixes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(f + "/" for f in self.folders), tuple(f + "/" for f in self.exclude_folders)

    @cached_property
    def _patterns(self):
        return tuple(re.compile(p, re.IGNORECASE) if p else None for p in (self.keywords, self.exclude))


R = ClassRule
# Ordered: earlier, more specific rules claim a file first (signal flags before flags, clothing
# before sports equipment, drinks before fruit so juice boxes are drinks). docs/clipart.md has the why.
CLIPART_RULES: tuple[ClassRule, ...] = (
    R("signal flag", ("signs_and_symbols/flags",), keywords=r"^signalflag"),
    R("flag", ("signs_and_symbols/flags",), exclude=r"golf|southen_cross",
      exclude_folders=("signs_and_symbols/flags/semaphore",)),
    R("playing card", ("recreation/games/cards",),
      exclude=r"andalusia|cassette|boy_face|celtic|leisler|photo|two_cats|cartes"),
    R("jigsaw puzzle piece", ("shapes/jigsaw",)),
    R("pattern", ("special/patterns",), exclude=r"model-view"),
    R("led light", ("signs_and_symbols/led",), exclude=r"rainbow"),
    R("pictogram", ("signs_and_symbols/map_symbols", "transportation/aiga-symbols", "computer/icons"),
      keywords=r"^aiga_|^hotel_icon"),
    R("safety sign", ("signs_and_symbols",),
      keywords=r"yves_gu|protection_obligatoire|sortie_issue|danger|hazard|radioactive|no_smoking|nosmoke"
               r"|inflammable|toxique|corrosi|matieres|radiations|rayonnement|risque|trebuchement|vehicules"
               r"|marquage|temperature|magneti|charges|chute",
      exclude=r"flag|^_|advertising", exclude_folders=("signs_and_symbols/flags", "signs_and_symbols/map_symbols")),
    R("road sign", ("transportation/roadsigns",), exclude=r"ampel|nws_gov|route_jakob|advertising"),
    R("weather symbol", ("signs_and_symbols/weather",)),
    R("weather symbol", ("signs_and_symbols",), keywords=r"cloud|sun|rain|snow|storm|lightning|moon|weather|nuage",
      exclude=r"tsunami|thought|sunwheel|flame|led|sung|taichi", exclude_folders=("signs_and_symbols/flags",)),
    R("smiley face", ("people/smilies",), exclude=r"crossbones|portrait|3_faces"),
    R("stick figure", ("people/stickmen",)),
    # four icon families: each theme's folder layout (filesystems, mimetypes, devices, actions, apps)
    R("folder icon", ("computer",), keywords=r"folder|fldr|plastik_icon|directory",
      exclude=r"box_with|fancy|cartella|bookmark"),
    R("file icon", ("computer/icons",), keywords=r"mime|document|^file|^doc|txt|pdf"),
    R("file icon", ("computer/icons/lemon-theme/mimetypes", "computer/icons/etiquette-theme/mimetypes")),
    R("device icon", ("computer/icons/flat-theme/device", "computer/icons/lemon-theme/devices",
                      "computer/icons/etiquette-theme/devices")),
    R("toolbar icon", ("computer/icons/flat-theme/action", "computer/icons/lemon-theme/actions",
                       "computer/icons/etiquette-theme/actions")),
    R("app icon", ("computer/icons/flat-theme/applications", "computer/icons/lemon-theme/apps",
                   "computer/icons/etiquette-theme/apps", "computer/icons/applications")),
    R("arrow", ("shapes/arrows", "computer/buttons"), keywords=r"arrow|direction", exclude=r"^tasto"),
    R("button", ("computer/buttons", "buttons"), exclude=r"shopping_cart"),
    R("button", ("computer", "shapes", "unsorted"), keywords=r"button|pulsante|tasto",
      exclude_folders=("shapes/stars", "shapes/arrows")),
    R("computer hardware", ("computer",),
      exclude=r"^bb_|folder|cloud|network|logic|model-view|linux|tux|jabbear|chomper|munch|teacher|building"
              r"|residential|internet|virus|user|reload|home|otto|clipboard|sand_glass|ebuild|preenchimento"
              r"|part_of_the|pastas|phone|aviso|browser|bluepane|the_electronic|io_anthony|finestr|plush|pacman|packman"
              r"|pong|tetris|pointer",
      exclude_folders=("computer/icons", "computer/buttons", "computer/folders", "computer/diagrams")),
    R("electronic device", ("electronics", "office/telephone"),
      exclude=r"capacitor|diode|resistor|transistor|bobine|filmphoto|navigation|pfd"),
    R("musical instrument", ("recreation/music",),
      keywords=r"drum|guitar|cello|derbouk|djamb|flute|horn|harp|maracas|dulcimer|oboe|piano_|saxo|trombone"
               r"|trumpet|tpt|violin|xylophone",
      exclude=r"theory"),
    R("clothing", ("people/clothing",),
      exclude=r"feet_in|gold_chain|earring|rings|straw_tote|shoe_print|magic_hat|thongs|jacob_leisler|propeller"),
    R("sports equipment", ("recreation",),
      keywords=r"ball|bat|glove|helmet|racket|racquet|dartboard|golf|rugby|surfboard|tennis|target|cricket"
               r"|badminton|net|anelli|rollerblades|sledge|scuba|nunchaku|cronometro",
      exclude=r"yoga|sport_|golf_drive|roller_blader|judo|karate|hikinh|backpacker|water_skier|plays_soccer"
              r"|beckham|sportcar|football_pitch|ballerina|balloon|baloon|heart-ballons"),
    R("insect", ("animals/bugs",), exclude=r"lumaca|virus|mostriciattolo|amibe"),
    R("bird", ("animals/birds",), exclude=r"bat|wing|manager|simbolo|turkey|tux"),
    R("bird", ("unsorted", "animals"), keywords=r"pinguin|penguin|anatra|papera|colombo|pennuto|struzzo|gabbiano",
      exclude=r"tux"),
    R("mammal", ("animals/mammals",), exclude=r"emule|mascot"),
    R("tree", (), keywords=r"fall_scene|tree|albero|arbre|palm|sapin|conifer|deciduous|evergreen|olivier_one|bamboo",
      exclude=r"wreath|christmas_balls|treeb|palm_0|cleanpalm|procman|_tree$|sidetree|krtree|view_tree|street",
      exclude_folders=("computer",)),
    R("drink", ("food",),
      keywords=r"juice|drink|coffe|(^|_)tea|milk|glass|mug|lemonade|pop_can|soda|beer|birra|wine|cuppa|tazza"
               r"|kubek|bottle",
      exclude=r"flower-pot|fondue|bread_and_wine"),
    R("fruit", ("food",),
      keywords=r"apple|banana|cherr|grape|lemon|lime|melon|orange|peach|pear|pera|pesca|pineapple|prune|prugna"
               r"|pasteque|strawberr|fruit",
      exclude=r"pie_|candied|juice|tote|grenade|champignon|gumnut|eris|kallisti|turkey"),
    R("dessert", ("food", "recreation/party"),
      keywords=r"cake|cone|glace|gelato|ice_cream|candy|lollipop|muffin|pie_|flan|gateau|gauffre|pudim|torta"
               r"|cookie|candied|marshmallow",
      exclude=r"egg",
      exclude_folders=("food/breads_and_carbs",)),
    R("meal", ("food",),
      exclude=r"pumpkin|zucca|pomodori|champignon|gumnut|watermelon|potato_nicu|chef|menu|plate|meatgrinder|frullatore"
              r"|libro|come_si|crawfish|toque|sugarbox|honey|frying_pan|fuoco|mcoon",
      exclude_folders=("food/beverages", "food/fruit", "food/desserts", "food/vegetables")),
    R("flower", ("plants", "unsorted", "signs_and_symbols"),
      keywords=r"flower|fiore|fiori|daffodil|daisy|rose|rosa|tulip|magnolia|sakura|geranium|lotas|bloom|bouquet"
               r"|daff|azalea|daylily|foxglove|hosta|hydrangea|trillium|mirjam",
      exclude=r"tree|vestito"),
    R("person", ("people",),
      exclude=r"box_with|inservice|frying_pan|card_figure|skull|baby_bottle|fingerprint|chat_icon|fire_engine"
              r"|icons_lumen|handshake|hand_print|eye|reminder|safety_pin|samoa|gender|van_gogh|wedding_sign"
              r"|xbill|alien|hygieia|profile|3_faces|don_t_panic|head\d|^ppl|cm1|buddy|boy_symbol|girl_symbol"
              r"|enthusiast|^people$|blacksmiti",
      exclude_folders=("people/smilies", "people/stickmen", "people/bodypart", "people/clothing")),
    R("person", ("unsorted",),
      keywords=r"ragazz|signorina|principessa|carpentiere|traslocatore|imbianchino|corridore|pesistica"
               r"|trekking|mr_lakshman|otto_needs|^donna"),
    R("map", ("geography", "signs_and_symbols/map_symbols"),
      keywords=r"map|carte|australia|wales|territory|queensland|tasmania|victoria|andalusia|aragon|asturias"
               r"|balear|basque|brazil|canar|cantabria|castilla|catalunya|europe|euskadi|extremadura|galicia"
               r"|madrid|murcia|navarra|oceania|africa|rios|spain|spanish|valencia|romania|ukrain|michigan"
               r"|amrum|municipios|peters|czech|mapa",
      exclude=r"symbol|rpg"),
    R("building", ("buildings",), exclude=r"brick|wall|capitello|old_sign|demolizione",
      exclude_folders=("buildings/furniture",)),
    R("tool", ("tools",),
      exclude=r"camera|phone|umbrella|lamp|telescope|binocolo|thermometer|smoke|insecticide|gallows|route_jakob"
              r"|panel|kexi|scart|stefan_graubner|natural_gas|nodding|metal_cage|mattone|bottle|pansement"
              r"|toothbrush|lighter|burner|aladino|ferro|ironing|vacuum|vavuum|cage|pan_frouke|scolapasta"
              r"|forchettoni|keyring|key_jordan|lock|padlock|mag\d|magni|lente|nunchaku|bussola|compass",
      exclude_folders=("tools/weapons", "tools/toys")),
    R("stationery", ("office", "education"),
      exclude=r"cross_hand|arrow|phone|lcd|video|floppy|stylized_cd|user_frederic|bluepane|handshake|reunion"
              r"|inservice|fabbrica|liberty|lotion|desk_lamp|lamp|lightbulb|cassa|certificate|cup_|istogramma|diagramma|tabella"
              r"|wooden_table|picture_frame|laser_pointer|lana|megaphone|school|carnegie|chemical|erlenmeyer"
              r"|logaritmic|otto|slate|book|bibl|libro|diary|newspaper|squirrel",
      exclude_folders=("office/telephone",)),
)  # fmt: skip
del R


# "Linked Image Not Found" placeholders that the SVG-to-PNG conversion left in the collection
CLIPART_BROKEN = (
    "animals/birds/duck_yellow_ii_kurt_cagl_.png",
    "animals/birds/penguin/tux_didier_fabert_01.png",
    "people/blacksmiti_ganson.png",
)


@dataclass(frozen=True)
class ClipartCuration:
    """Everything that decides the clip-art dataset's content; its hash names the cache file."""

    rules: tuple[ClassRule, ...] = CLIPART_RULES
    exclude_files: tuple[str, ...] = CLIPART_BROKEN
    min_images: int = 40  # a class with fewer successfully rendered images is dropped
    max_images: int = 300  # larger classes (flags, icons) keep a hash-chosen 300, to stay balanced
    size: int = 32  # rendered side in pixels
    test_fraction: float = 0.2
    max_pixels: int = MAX_PIXELS  # larger files are skipped unread

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClipartPlan:
    """The curated file list before rendering: one entry per distinct file (symlinks folded)."""

    root: str
    paths: list[str] = field(default_factory=list)  # absolute path of each file
    labels: list[str] = field(default_factory=list)  # class name of each file
    unassigned: int = 0  # distinct files no rule claimed
    capped: dict[str, int] = field(default_factory=dict)  # class -> files left out by max_images


def plan_clipart(root: str, curation: ClipartCuration = ClipartCuration()) -> ClipartPlan:
    """Apply the curation rules to the files under `root` (reads names only, decodes nothing)."""
    real_root = os.path.realpath(root)
    aliases: dict[str, list[str]] = {}  # real path -> every relative path that leads to it
    for rel, real in _walk_png(real_root):  # real paths, so symlinks fold into one file
        aliases.setdefault(real, []).append(rel)
    plan = ClipartPlan(root=real_root)
    members: dict[str, list[str]] = {}
    for real in sorted(aliases):
        home = os.path.relpath(real, real_root).replace(os.sep, "/")
        if home in curation.exclude_files:
            continue
        # The file's own folder decides first; the folders that link to it only when that fails
        # (flags/ links to maps in geography/, which are maps, not flags).
        names = [[(home, _stem(home))], [(rel, _stem(rel)) for rel in sorted(aliases[real]) if rel != home]]
        name = next(
            (r.name for group in names for r in curation.rules if any(r.matches(rel, st) for rel, st in group)), None
        )
        if name is None:
            plan.unassigned += 1
        else:
            members.setdefault(name, []).append(real)
    for name in sorted(members):
        files = sorted(members[name], key=lambda p: _unit_hash(name + "/" + os.path.basename(p)))
        if len(files) > curation.max_images:
            plan.capped[name] = len(files) - curation.max_images
            files = files[: curation.max_images]
        for p in sorted(files):
            plan.paths.append(p)
            plan.labels.append(name)
    return plan


def _stem(relpath: str) -> str:
    return os.path.splitext(relpath.rsplit("/", 1)[-1])[0]


def _walk_png(root: str, rel: str = ""):
    """(relative path, real path) of every .png under `root`, symlinked files included once per link.

    Symlinked folders are not followed (os.walk's default), so every file has finitely many names.
    """
    with os.scandir(os.path.join(root, rel)) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            path = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                yield from _walk_png(root, path)
            elif e.name.lower().endswith(".png") and e.is_file():
                yield path, os.path.realpath(e.path) if e.is_symlink() else e.path


def build_clipart(
    root: str,
    cache_dir: str | os.PathLike | None = None,
    curation: ClipartCuration = ClipartCuration(),
    workers: int = 2,
) -> ImageDataset:
    """The curated clip-art dataset, from the cache when it is there, else rendered and cached."""
    if not os.path.isdir(root):
        raise TinaError(
            f"clip art not found at {root}: install it with `apt-get install openclipart-png`, "
            f"or point {ROOT_OPTION} (or $TINA_CLIPART) at a folder of PNG files in category folders"
        )
    plan = plan_clipart(root, curation)
    root = plan.root
    if not plan.paths:
        raise TinaError(f"no clip art under {root} matches the curation rules (is it openclipart-png's png/ folder?)")
    key = _sha1_json(
        {"format": CACHE_FORMAT, "curation": curation.to_dict(), "files": _file_fingerprint(plan.paths, root),
         "labels": plan.labels}
    )  # fmt: skip
    path = Path(cache_dir or default_cache_dir()) / f"clipart-{key[:16]}.npz"
    frame = render_frame(curation.size, crop=True)
    ds = _load_npz(path, "clipart", frame)
    if ds is not None:
        return ds
    start = time.perf_counter()
    images, ok, failures = _render_many(plan.paths, frame, curation.max_pixels, workers, desc="rendering clip art")
    if failures:
        log.warning("clipart: skipped %d of %d files that could not be decoded", len(failures), len(plan.paths))
        for p, err in failures:
            log.debug("skipped %s: %s", p, err)
    labels = np.array(plan.labels)
    counts = {c: int(((labels == c) & ok).sum()) for c in sorted(set(plan.labels), key=str.casefold)}
    classes = [c for c, n in counts.items() if n >= curation.min_images]
    dropped = {c: n for c, n in counts.items() if n < curation.min_images}
    if dropped:
        log.warning("clipart: dropped classes with fewer than %d images: %s", curation.min_images, dropped)
    keep = ok & np.isin(labels, classes)
    index = {c: i for i, c in enumerate(classes)}
    ids = np.array([index[c] for c in labels[keep]], dtype=np.int64)
    rel = [os.path.relpath(p, root) for p in np.array(plan.paths)[keep]]
    ds, test = _dataset_from_render(
        "clipart", classes, images[keep], ids, [group_key(p) for p in rel], curation.test_fraction, frame
    )
    seconds = time.perf_counter() - start
    meta = {
        "root": root, "build_seconds": round(seconds, 1), "unassigned": plan.unassigned, "capped": plan.capped,
        "dropped": dropped, "skipped": [[os.path.relpath(p, root), e] for p, e in failures],
        "train_files": np.array(rel)[~test].tolist(), "test_files": np.array(rel)[test].tolist(),
    }  # fmt: skip
    _save_npz(path, _cache_arrays(ds, meta))
    log.info(
        "clipart: rendered %d images in %d classes in %.1f s (%d skipped); cached at %s (%.1f MB)",
        int(keep.sum()), len(classes), seconds, len(failures), path, path.stat().st_size / 1e6,
    )  # fmt: skip
    return ds


def _sha1_json(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Image folders


def _load_imagefolder(cfg: DatasetConfig, cache_dir: str | None, workers: int = 2) -> ImageDataset:
    """`root/<class folder>/<image>`, rendered by tina.images.render to the configured size and channels
    (white paper, aspect kept, up or down) and cached; class names from `cfg.class_names` or the folder."""
    from torchvision.datasets import ImageFolder

    root = cfg.root
    if not root:
        raise TinaError(f"dataset.name=imagefolder needs its folder: set {ROOT_OPTION}, a folder with one subfolder per class")
    if not os.path.isdir(root):
        raise TinaError(f"image folder {root} does not exist; set {ROOT_OPTION}, a folder with one subfolder per class")
    try:
        folder = ImageFolder(root, loader=lambda p: p)  # discovery only; decoding is ours
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise TinaError(f"{root} is not an image folder ({e}); it needs one subfolder of images per class") from e
    unknown = sorted(set(cfg.class_names) - set(folder.classes))
    if unknown:
        raise TinaError(f"dataset.class_names names folders that {root} does not have: {unknown} (it has {folder.classes})")
    classes = [cfg.class_names.get(c) or c.replace("_", " ") for c in folder.classes]
    if len(set(classes)) != len(classes):
        raise TinaError(f"two class folders of {root} get the same class name: {classes}; set dataset.class_names")
    root = os.path.abspath(root)
    paths = [p for p, _ in folder.samples]
    targets = np.array([t for _, t in folder.samples], dtype=np.int64)
    frame = render_frame(cfg.size, cfg.channels)
    key = _sha1_json(
        {"format": CACHE_FORMAT, "root": root, "size": cfg.size, "channels": cfg.channels, "max_pixels": MAX_PIXELS,
         "test_fraction": cfg.test_fraction, "files": _file_fingerprint(paths, root), "targets": targets.tolist()}
    )  # fmt: skip
    path = Path(cache_dir or default_cache_dir()) / f"imagefolder-{key[:16]}.npz"
    ds = _load_npz(path, "imagefolder", frame)
    if ds is not None:
        return replace(ds, classes=classes)  # names are not part of the pixels: renaming needs no re-render
    start = time.perf_counter()
    images, ok, failures = _render_many(paths, frame, MAX_PIXELS, workers, desc=f"rendering {root}")
    if failures:
        log.warning("imagefolder: skipped %d of %d files that could not be decoded", len(failures), len(paths))
    if not ok.any():
        raise TinaError(f"none of the {len(paths)} images under {root} could be decoded")
    rel = [os.path.relpath(p, root) for p in np.array(paths)[ok]]
    keys = [os.path.dirname(r) + "/" + group_key(r) for r in rel]
    ds, test = _dataset_from_render("imagefolder", classes, images[ok], targets[ok], keys, cfg.test_fraction, frame)
    meta = {"root": root, "build_seconds": round(time.perf_counter() - start, 1),
            "skipped": [[os.path.relpath(p, root), e] for p, e in failures],
            "train_files": np.array(rel)[~test].tolist(), "test_files": np.array(rel)[test].tolist()}  # fmt: skip
    _save_npz(path, _cache_arrays(ds, meta))
    log.info("imagefolder: rendered %d images of %d classes; cached at %s", int(ok.sum()), len(classes), path)
    return ds
