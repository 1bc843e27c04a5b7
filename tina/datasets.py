"""Image datasets: the pictures whose classifiers Tina learns to generate.

`load_dataset(name)` returns an `ImageDataset`: uint8 (N, H, W, C) arrays, int64 labels,
human-readable class names (the text the generator is conditioned on) and the `ImageSpec` a
target network needs. Everything downstream (zoo_builder, evaluation) sees only this one shape.

Datasets:
  fashion-mnist  the IDX files from Debian's `dataset-fashion-mnist` (or any folder holding them)
  clipart        ~40 classes curated from Debian's `openclipart-png`; rules in `CLIPART_RULES`,
                 the resulting class list in docs/clipart.md. Rendered once to 32x32 and cached.
  cifar10/100    torchvision's CIFAR loaders; downloads only when asked to
  imagefolder    any `root/<class name>/<image>` tree, rendered like clipart and cached

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

import numpy as np
import torch
from PIL import Image, ImageChops
from tqdm.auto import tqdm

from tina.errors import TinaError
from tina.targets import ImageSpec

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "clipart", "cifar10", "cifar100", "imagefolder")

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
CLIPART_ROOT = "/usr/share/openclipart/png"  # Debian's openclipart-png
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
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()  # (n, C, H, W) uint8
        return x.float().div_(255.0), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

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


def load_dataset(
    name: str, root: str | None = None, *, download: bool = False, cache_dir: str | None = None
) -> ImageDataset:
    """Load a dataset by name. `root` overrides where its files are; raises TinaError when missing.

    download: let torchvision fetch CIFAR (Fashion-MNIST is fetched when missing and online).
    cache_dir: where rendered datasets are cached (default `$TINA_CACHE/datasets`).
    """
    if name == "fashion-mnist":
        return _load_fashion_mnist(root, download)
    if name == "clipart":
        root = root or os.environ.get("TINA_CLIPART") or CLIPART_ROOT
        return build_clipart(root, cache_dir=cache_dir)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, root, download)
    if name == "imagefolder":
        return _load_imagefolder(root, cache_dir)
    raise TinaError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


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
            "`apt-get install dataset-fashion-mnist`, or point --data-root (or $TINA_FASHION_MNIST) at a folder "
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
        image=ImageSpec(1, 28, mean, std),
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


_CIFAR = {  # name -> (torchvision class, folder inside root, archive)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _load_cifar(name: str, root: str | None, download: bool) -> ImageDataset:
    root = root or os.environ.get("TINA_CIFAR") or str(default_cache_dir() / "cifar")
    cls_name, folder, url = _CIFAR[name]
    if not download and not os.path.isdir(os.path.join(root, folder)):
        raise TinaError(
            f"{name} not found: extract {url} so that {os.path.join(root, folder)} exists "
            f"(--data-root / $TINA_CIFAR choose the parent folder), or pass --download"
        )
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    try:
        with _socket_timeout(60):
            train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted", or no network
        raise TinaError(f"cannot load {name} from {root}: {e}; re-extract {url} there or pass --download") from e
    train_x = np.asarray(train.data, dtype=np.uint8)  # (N, 32, 32, 3)
    mean, std = channel_stats(train_x)
    return ImageDataset(
        name=name,
        classes=[c.replace("_", " ") for c in train.classes],
        train_x=train_x,
        train_y=np.asarray(train.targets, dtype=np.int64),
        test_x=np.asarray(test.data, dtype=np.uint8),
        test_y=np.asarray(test.targets, dtype=np.int64),
        image=ImageSpec(3, 32, mean, std),
    )


# ---------------------------------------------------------------------------------------------
# Rendering: any image file -> (size, size, 3) uint8 on white, decoded once and safely

MAX_PIXELS = 200_000_000  # decode budget: ~800 MB as RGBA. The ~170 MP clip art fits; 231-623 MP files are skipped
_BAND_PIXELS = 4_000_000  # huge images are shrunk in horizontal bands of about this many pixels


class _Skip(Exception):
    """A file that is valid but that we decline to decode (too large, blank)."""


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


def render_image(path: str, size: int = 32, crop: bool = True, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image to (size, size, 3) uint8: alpha over white, aspect kept, padded with white.

    crop: trim to the drawing first (transparent or white margins), so small clip art fills the frame.
    Raises on undecodable files and `_Skip` on files over `max_pixels`; callers count both.
    """
    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise _Skip(f"{w}x{h} is over the {max_pixels / 1e6:.0f} MP decode budget")
        im.draft("RGB", (size * 4, size * 4))  # JPEG decodes at 1/2..1/8 scale; PNG ignores it
        im.load()
        if im.mode == "RGBA" or im.mode == "RGB":
            pass
        elif "transparency" in im.info or im.mode in ("P", "PA", "LA", "La", "RGBa"):
            im = im.convert("RGBA")
        else:
            im = im.convert("RGB")
        box = _content_box(im) if crop else (0, 0, *im.size)
        if box is None:
            raise _Skip("blank image")
        small = _shrink(im, box, size * 4)
    if small.mode == "RGBA":  # composite only now: the shrink averaged premultiplied colours
        canvas = Image.new("RGBA", small.size, (255, 255, 255, 255))
        canvas.alpha_composite(small)
        small = canvas.convert("RGB")
    scale = size / max(small.size)
    fit = (max(1, round(small.width * scale)), max(1, round(small.height * scale)))
    small = small.resize(fit, Image.Resampling.LANCZOS)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(small, ((size - fit[0]) // 2, (size - fit[1]) // 2))
    return np.asarray(out, dtype=np.uint8)


def _content_box(im: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of the drawing: non-transparent pixels, or non-white ones without alpha."""
    if im.mode == "RGBA":
        return im.getbbox()  # alpha only
    return ImageChops.difference(im, Image.new("RGB", im.size, (255, 255, 255))).getbbox()


def _shrink(im: Image.Image, box: tuple[int, int, int, int], target: int) -> Image.Image:
    """Crop `box` and shrink it by an integer factor to about `target` px on its long side.

    `Image.reduce` premultiplies alpha into a full-size copy; doing it band by band keeps the peak
    memory of a 170 MP image at its decoded size instead of twice that.
    """
    x0, y0, x1, y1 = box
    factor = max(1, max(x1 - x0, y1 - y0) // target)
    if factor == 1:
        return im.crop(box)
    out = Image.new(im.mode, (-(-(x1 - x0) // factor), -(-(y1 - y0) // factor)))
    band = factor * max(1, _BAND_PIXELS // (factor * (x1 - x0)))  # rows per band, a multiple of factor
    for y in range(y0, y1, band):
        out.paste(im.crop((x0, y, x1, min(y + band, y1))).reduce(factor), (0, (y - y0) // factor))
    return out


def _render_job(job: tuple[str, int, bool, int]) -> tuple[np.ndarray | None, str | None]:
    """Worker entry point: (image, None) or (None, reason)."""
    path, size, crop, max_pixels = job
    try:
        with _pil_pixel_limit(max_pixels):
            return render_image(path, size, crop, max_pixels), None
    except Exception as e:  # one bad file must not stop a build of thousands; the caller counts them
        return None, f"{type(e).__name__}: {e}"


def _render_many(paths: list[str], size: int, crop: bool, max_pixels: int, workers: int, desc: str):
    """Render files in a process pool with a progress bar; returns (images, ok mask, failures)."""
    jobs = [(p, size, crop, max_pixels) for p in paths]
    images = np.full((len(paths), size, size, 3), 255, dtype=np.uint8)
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


def _load_npz(path: Path, name: str) -> ImageDataset | None:
    """An ImageDataset from a cache file, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            ds = ImageDataset(
                name=name,
                classes=[str(c) for c in z["classes"]],
                train_x=z["train_x"], train_y=z["train_y"], test_x=z["test_x"], test_y=z["test_y"],
                image=ImageSpec.from_dict(meta["image"]),
            )  # fmt: skip
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding", path, e)
        return None
    log.info("loaded %s from cache %s", name, path)
    return ds


def _dataset_from_render(name, classes, images, labels, keys, test_fraction, size) -> tuple[ImageDataset, np.ndarray]:
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
        image=ImageSpec(3, size, mean, std),
    )
    return ds, test


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
            "or point --data-root (or $TINA_CLIPART) at a folder of PNG files in category folders"
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
    ds = _load_npz(path, "clipart")
    if ds is not None:
        return ds
    start = time.perf_counter()
    images, ok, failures = _render_many(
        plan.paths, curation.size, True, curation.max_pixels, workers, desc="rendering clip art"
    )
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
        "clipart", classes, images[keep], ids, [group_key(p) for p in rel], curation.test_fraction, curation.size
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


def _load_imagefolder(root: str | None, cache_dir: str | None, size: int = 32, workers: int = 2) -> ImageDataset:
    """`root/<class>/<image>` via torchvision's ImageFolder, rendered to size x size RGB and cached."""
    from torchvision.datasets import ImageFolder

    if not root:
        raise TinaError("imagefolder needs a folder: pass --data-root PATH with one subfolder per class")
    if not os.path.isdir(root):
        raise TinaError(f"image folder {root} does not exist; pass --data-root PATH with one subfolder per class")
    try:
        folder = ImageFolder(root, loader=lambda p: p)  # discovery only; decoding is ours
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise TinaError(f"{root} is not an image folder ({e}); it needs one subfolder of images per class") from e
    root = os.path.abspath(root)
    paths = [p for p, _ in folder.samples]
    targets = np.array([t for _, t in folder.samples], dtype=np.int64)
    classes = [c.replace("_", " ") for c in folder.classes]
    key = _sha1_json(
        {"format": CACHE_FORMAT, "root": root, "size": size, "max_pixels": MAX_PIXELS,
         "files": _file_fingerprint(paths, root), "targets": targets.tolist()}
    )  # fmt: skip
    path = Path(cache_dir or default_cache_dir()) / f"imagefolder-{key[:16]}.npz"
    ds = _load_npz(path, "imagefolder")
    if ds is not None:
        return ds
    start = time.perf_counter()
    images, ok, failures = _render_many(paths, size, False, MAX_PIXELS, workers, desc=f"rendering {root}")
    if failures:
        log.warning("imagefolder: skipped %d of %d files that could not be decoded", len(failures), len(paths))
    if not ok.any():
        raise TinaError(f"none of the {len(paths)} images under {root} could be decoded")
    rel = [os.path.relpath(p, root) for p in np.array(paths)[ok]]
    keys = [os.path.dirname(r) + "/" + group_key(r) for r in rel]
    ds, _ = _dataset_from_render("imagefolder", classes, images[ok], targets[ok], keys, 0.2, size)
    meta = {"root": root, "build_seconds": round(time.perf_counter() - start, 1),
            "skipped": [[os.path.relpath(p, root), e] for p, e in failures]}  # fmt: skip
    _save_npz(path, _cache_arrays(ds, meta))
    log.info("imagefolder: rendered %d images of %d classes; cached at %s", int(ok.sum()), len(classes), path)
    return ds
