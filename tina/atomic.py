"""Atomic writes, the one way Tina writes: a file (`atomic_write`) or a whole folder (`atomic_folder`).

Files: a temporary file beside the destination, synced, then renamed into place.
Folders: build it under a temporary name beside its destination, then swap it in.

A crash, a full disk or Ctrl-C leaves the old folder or the new one, never neither and never a
half-written one: the new folder is filled under `.NAME.tina-tmp-PID-XXXX`, then exchanged with the
old one in one atomic rename (Linux renameat2 RENAME_EXCHANGE; elsewhere two renames with the old
folder kept until the new one is in place). Only folders Tina wrote are ever replaced, and only when
they hold nothing but Tina's files: a user's folder or file is never deleted.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tina.errors import TinaError

log = logging.getLogger(__name__)
TMP_TAG = ".tina-tmp-"  # temporary folders are .NAME.tina-tmp-PID-XXXX beside their destination


@dataclass(frozen=True)
class FolderKind:
    """What makes a folder Tina's: a JSON file whose "format" is ours, and the file names Tina writes."""

    marker: str  # e.g. "config.json"
    format: str  # e.g. "tina-model/1"
    files: frozenset[str]  # every name Tina may write into it
    what: str  # for messages: "model folder"


def check_replaceable(path: Path, kind: FolderKind) -> None:
    """TinaError unless `path` is absent, an empty folder, or a folder of `kind` holding only Tina's files."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise TinaError(f"{str(path)!r} exists and is not a folder; choose another output")
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as e:
        raise TinaError(f"cannot read {str(path)!r}: {e.strerror}") from None
    if not names:
        return
    fmt = None
    try:
        meta = json.loads((path / kind.marker).read_text())
        fmt = meta.get("format") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        pass
    if fmt != kind.format:
        raise TinaError(f"{str(path)!r} is not empty and not a Tina {kind.what} (no {kind.marker} with format "
                        f"{kind.format!r}); choose another output, Tina replaces only folders it wrote")
    foreign = sorted(names - kind.files)
    if foreign:
        raise TinaError(f"{str(path)!r} holds files Tina did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); move them or choose another output")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux >= 3.15); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> None:
    """Temporary folders for `path` left by killed Tina processes (their pid no longer runs)."""
    prefix = f".{path.name}{TMP_TAG}"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if "-old-" in p.name and not path.exists() and (p / path.name).is_dir():
                os.rename(p / path.name, path)  # killed between the two renames: the old folder comes back
            log.info("removing %s, left by a killed Tina process", p)
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike, kind: FolderKind):
    """`with atomic_folder(dest, kind) as tmp:` fill `tmp`; on success it replaces `dest` (0755 / 0644).

    TinaError before anything is written when `dest` is not replaceable (see check_replaceable)."""
    path = Path(path)
    check_replaceable(path, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_TAG}{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise TinaError(f"cannot write to {str(path)!r}: {e.strerror}") from None
    try:
        yield tmp
        # mkdtemp makes 0700 folders and safetensors 0600 files; published folders are ordinary.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        check_replaceable(path, kind)  # again: the user may have added files while we worked
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):  # now tmp holds the old folder
            shutil.rmtree(tmp)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_TAG}{os.getpid()}-old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; on success it is flushed, synced, made 0644
    and renamed into place, on any failure removed. The one way Tina writes a single file:

        with atomic_write(path) as f:       # binary; mode="w" for text (UTF-8)
            f.write(data)

    Readers see the old file or the new one, never a half-written one. A killed writer leaves
    `.NAME.tina-tmp-PID-XXXX`, which `stale_files` finds."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}{os.getpid()}-", dir=path.parent)
    except OSError as e:
        raise TinaError(f"cannot write to {str(path)!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; Tina's files are as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write one binary file atomically (atomic_write)."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write one text file atomically (atomic_write)."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def stale_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """Temporary files a killed atomic_write of folder/name left behind, whose writer is gone."""
    out = []
    for p in Path(folder).glob(f".{name}{TMP_TAG}*"):
        pid = p.name[len(f".{name}{TMP_TAG}"):].split("-")[0]
        if p.is_file() and not (pid.isdigit() and _pid_alive(int(pid))):
            out.append(p)
    return out
