"""Reading zoo shards: the one place a shard's bytes become arrays, and nothing else runs.

A shard is an uncompressed tar of `KEY.MEMBER` files (zoo_builder/shards.py writes them). Tina reads
five members per model and decodes each with an explicit, code-free decoder: `.npy` through
`np.load(allow_pickle=False)`, `.json` through `json`. Any other member (a planted `.pyd`, `.pth`,
`.pickle`...) is never decoded: a zoo is data, and data must not run code (webdataset's default
decoders would unpickle those).

Every shard is checked against the sha256 its manifest records before any member is read, and every
parameter vector must be finite and of plausible size, so a flipped byte or a diverged model stops
the run with one clear line instead of changing results silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tina.errors import TinaError

log = logging.getLogger(__name__)

# The members Tina reads, each with its decoder; everything else in a shard is ignored unread.
MEMBERS = ("params.npy", "emb.npy", "classes.json", "prompts.json", "metrics.json")
MAX_ABS_PARAM = 1e4  # a fine-tuned classifier weight beyond this is a diverged or corrupt model


@dataclass(frozen=True)
class ShardFile:
    """One shard of a zoo and the checksum its manifest records for it."""

    path: Path
    sha256: str | None  # None: a zoo built before checksums (read, with a warning)

    def __str__(self) -> str:
        return str(self.path)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_params(params: np.ndarray, where: str) -> None:
    """TinaError unless every parameter is finite and |w| <= MAX_ABS_PARAM (used by the builder too)."""
    if not np.isfinite(params).all():
        raise TinaError(f"{where}: {int((~np.isfinite(params)).sum())} parameter(s) are NaN or infinite "
                        "(a diverged fine-tune or a corrupt zoo); rebuild the zoo, e.g. with a lower finetune.lr")
    peak = float(np.abs(params).max()) if params.size else 0.0
    if peak > MAX_ABS_PARAM:
        raise TinaError(f"{where}: a parameter has magnitude {peak:.3g} (> {MAX_ABS_PARAM:g}); "
                        "the model diverged or the zoo is corrupt; rebuild it, e.g. with a lower finetune.lr")


def _npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise TinaError(f"{where} is not a plain numeric .npy array ({e})") from None


def decode(key: str, raw: dict[str, bytes], shard: Path) -> dict:
    """Tina's members of one sample → {"key", "params" (P,) float32, "emb" (k, V, E) float32, "classes",
    "class_ids", "prompts", "metrics"}; TinaError naming the shard and member when one is wrong."""
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise TinaError(f"{shard}: sample {key!r} lacks {', '.join(missing)}; the shard is corrupt (rebuild the zoo)")
    where = f"{shard}: {key}"
    params = _npy(raw["params.npy"], f"{where}.params.npy").astype(np.float32, copy=False)
    emb = _npy(raw["emb.npy"], f"{where}.emb.npy").astype(np.float32)
    if params.ndim != 1 or emb.ndim != 3:
        raise TinaError(f"{where}: params.npy must be a vector and emb.npy (k, V, E); got shapes {params.shape} and {emb.shape}")
    check_params(params, f"{where}.params.npy")
    try:
        classes, prompts, metrics = (json.loads(raw[m]) for m in ("classes.json", "prompts.json", "metrics.json"))
        names, ids = classes["names"], classes["ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise TinaError(f"{where}: malformed JSON member ({e!r}); the shard is corrupt (rebuild the zoo)") from None
    if not (isinstance(names, list) and isinstance(ids, list) and len(names) == len(ids) == emb.shape[0]
            and all(isinstance(i, int) for i in ids)):
        raise TinaError(f"{where}.classes.json does not match its {emb.shape[0]} embeddings")
    return {"key": key, "params": params, "emb": emb, "classes": names, "class_ids": ids, "prompts": prompts, "metrics": metrics}


class ShardReader:
    """Random access to the samples of verified shards: `reader.keys(shard)`, `reader.read(shard, key)`.

    Each shard is hashed once when first opened (then its member index is kept); at most `max_open`
    tar files stay open."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._open: OrderedDict[Path, tuple[tarfile.TarFile, dict[str, dict[str, tarfile.TarInfo]]]] = OrderedDict()
        self._keys: dict[Path, list[str]] = {}

    def _index(self, shard: ShardFile):
        entry = self._open.get(shard.path)
        if entry is not None:
            self._open.move_to_end(shard.path)
            return entry
        verify(shard)
        try:
            tar = tarfile.open(shard.path, "r:")
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tar.getmembers():
                if m.isfile() and "." in m.name:
                    key, member = m.name.split(".", 1)
                    if member in MEMBERS:
                        samples.setdefault(key, {})[member] = m
        except (tarfile.TarError, OSError, EOFError) as e:
            raise TinaError(f"{shard.path} is not a readable shard ({e}); rebuild the zoo") from None
        self._open[shard.path] = (tar, samples)
        self._keys.setdefault(shard.path, list(samples))
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1][0].close()
        return tar, samples

    def keys(self, shard: ShardFile) -> list[str]:
        """Sample keys in file order."""
        if shard.path not in self._keys:
            self._index(shard)
        return self._keys[shard.path]

    def read(self, shard: ShardFile, key: str) -> dict:
        tar, samples = self._index(shard)
        try:
            raw = {name: tar.extractfile(info).read() for name, info in samples[key].items()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise TinaError(f"{shard.path} is truncated or corrupt ({e}); rebuild the zoo") from None
        return decode(key, raw, shard.path)

    def close(self) -> None:
        for tar, _ in self._open.values():
            tar.close()
        self._open.clear()


_verified: dict[tuple, bool] = {}  # (path, size, mtime_ns, sha256) already hashed in this process


def verify(shard: ShardFile) -> None:
    """TinaError unless the shard's bytes have the checksum the manifest records."""
    try:
        st = shard.path.stat()
    except OSError as e:
        raise TinaError(f"cannot read shard {shard.path}: {e.strerror}") from None
    if shard.sha256 is None:
        log.warning("%s: the zoo manifest records no checksum (built before checksums); not verified", shard.path)
        return
    ident = (str(shard.path), st.st_size, st.st_mtime_ns, shard.sha256)
    if ident in _verified:
        return
    if file_sha256(shard.path) != shard.sha256:
        raise TinaError(f"{shard.path} does not match the checksum in its zoo's manifest (corrupt or edited); "
                        "rebuild the zoo (a build resumes: delete the shard and run the same `tina zoo build`)")
    _verified[ident] = True


def read_shards(shards: list[ShardFile], limit: int | None = None) -> list[dict]:
    """Every sample of the shards, in order (decoded as in `decode`), at most `limit`."""
    reader, out = ShardReader(max_open=1), []
    try:
        for shard in shards:
            for key in reader.keys(shard):
                if limit is not None and len(out) >= limit:
                    return out
                out.append(reader.read(shard, key))
    finally:
        reader.close()
    return out
