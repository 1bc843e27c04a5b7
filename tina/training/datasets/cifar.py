"""CIFAR-10/100 in torchvision's layout, read by a safe reader that rebuilds arrays and runs no pickled code."""

from __future__ import annotations

import hashlib
import os
import pickle  # only through _ArraysOnlyUnpickler, which rebuilds arrays and nothing else
import warnings

import numpy as np

from tina.errors import TinaError
from tina.targets import ImageSpec
from tina.training.datasets.core import ROOT_OPTION, ImageDataset, channel_stats, default_cache_dir
from tina.training.datasets.download import _socket_timeout


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
