"""Any `root/<class folder>/<image>` tree, rendered to the configured size and channels and cached."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tina.errors import TinaError
from tina.images import DATASET_MAX_PIXELS as MAX_PIXELS
from tina.training.datasets.core import CACHE_FORMAT, ROOT_OPTION, DatasetConfig, ImageDataset, default_cache_dir
from tina.training.datasets.render import (
    _cache_arrays,
    _dataset_from_render,
    _file_fingerprint,
    _load_npz,
    _render_many,
    _save_npz,
    _sha1_json,
    group_key,
    render_frame,
)

log = logging.getLogger(__name__)


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
