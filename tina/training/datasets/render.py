"""Rendering many image files into a dataset: process pool, progress, failures, the split and the cache.

tina.images.render is the one decode path; this file only schedules it and stores what it made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from tina.atomic import atomic_write
from tina.errors import TinaError
from tina.images import render
from tina.targets import ImageSpec
from tina.training.datasets.core import CACHE_FORMAT, ImageDataset, channel_stats

log = logging.getLogger(__name__)


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


# ---- deterministic split and the rendered-dataset cache ----------------------------------------


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
    """Write the cache atomically (tina.atomic): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)


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


def _sha1_json(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()
