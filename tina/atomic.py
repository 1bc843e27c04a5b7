"""Write a folder all at once: build it under a temporary name beside its destination, then rename.

A crash, a full disk or Ctrl-C leaves the old folder (or nothing), never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tina.errors import TinaError


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """`with atomic_folder(dest) as tmp:` fill `tmp`; on success it replaces `dest` (0755 / 0644)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise TinaError(f"cannot write to {str(path)!r}: {e.strerror}") from None
    try:
        yield tmp
        # mkdtemp makes 0700 folders and safetensors 0600 files; published folders are ordinary.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write one text file under a temporary name in its folder, then rename it into place (0644)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise TinaError(f"cannot write to {str(path)!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
