"""Building kernels.c into a shared library and loading it only after verifying it.

The library is built once per source, compiler flags and CPU (it uses -march=native) into
$TINA_KERNEL_CACHE (default ~/.cache/tina/kernels), written under a temporary name and renamed, with
its sha256 beside it. Loading a library runs its code, so a cached one is used only when the folder
and both files belong to this user and nobody else can write them, and its bytes (read through the
very file descriptor that is then loaded) have the recorded sha256; otherwise it is rebuilt, and a
cache folder that is not private is not used at all (the build goes to a private temporary folder).
TINA_KERNELS=0 turns the C kernels off; a failed build is one logged warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

from tina.targets import CNN5kBody
from zoo_builder.kernels.ctypes_ops import C1, CKernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
SOURCES = (SOURCE, SOURCE.with_name("kernels_body.h"))  # what the library is built from (its cache key)
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")

_lock = threading.Lock()
_loaded: dict[str, CKernels | None] = {}


def _cache_dir() -> Path:
    env = os.environ.get("TINA_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tina" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(cc: str, out: Path) -> None:
    """Compile kernels.c into `out` and its sha256 into `out`.sha256, atomically (temporary names in the
    same folder, then renames; the checksum last, so a library without one is never trusted)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True, timeout=120)
        os.chmod(tmp, 0o755)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, out)
        side = _sidecar(out)
        side_tmp = side.with_name(side.name + f".{os.getpid()}.tmp")
        side_tmp.write_text(digest)
        os.replace(side_tmp, side)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sidecar(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else."""
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private_dir(d: Path) -> bool:
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _private(st)


def _open_verified(lib: Path) -> int | None:
    """A file descriptor of the cached library when it and its checksum are private and match; else None."""
    try:
        with open(_sidecar(lib), "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as side:
            if not _private(os.fstat(side.fileno())):
                return None
            expected = side.read(128).decode("ascii", "replace").strip()
        fd = os.open(lib, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    st = os.fstat(fd)
    h = hashlib.sha256()
    if stat.S_ISREG(st.st_mode) and _private(st):
        for block in iter(lambda: os.read(fd, 1 << 20), b""):
            h.update(block)
        if h.hexdigest() == expected:
            return fd
    os.close(fd)
    return None


def _load_verified(cc: str, name: str) -> CKernels:
    """Build if needed, verify, and load: through /proc/self/fd, so the bytes loaded are the bytes checked."""
    folder, scratch = _cache_dir(), None
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private_dir(folder):
        log.warning("kernel cache %s is not private to this user (owner or permissions); building in a private "
                    "temporary folder instead", folder)  # fmt: skip
        folder = scratch = Path(tempfile.mkdtemp(prefix="tina-kernels-"))
    path = folder / name
    try:
        fd = _open_verified(path)
        if fd is None:
            log.info("compiling %s -> %s", SOURCE.name, path)
            _compile(cc, path)
            fd = _open_verified(path)
            if fd is None:
                raise OSError(f"{path} changed between its build and its check")
        try:
            proc = f"/proc/self/fd/{fd}"
            return CKernels(ctypes.CDLL(proc if os.path.exists(proc) else str(path)))
        finally:
            os.close(fd)
    finally:
        if scratch is not None:  # the loaded mapping outlives the file
            shutil.rmtree(scratch, ignore_errors=True)


def load() -> CKernels | None:
    """The compiled kernels (built on first use), or None where they cannot be had (logged once)."""
    if os.environ.get("TINA_KERNELS", "1") == "0":
        return None
    if CNN5kBody.widths[0] != C1:
        return None
    if "lib" in _loaded:  # called every training step: no lock, no PATH search once decided
        return _loaded["lib"]
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        kernels = None
        if cc is None:
            log.warning("no C compiler (cc, gcc or clang) found: batched CPU training uses torch ops (about 2x slower)")
        else:
            key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + " ".join(FLAGS).encode() + cc.encode() + _cpu_id().encode())
            try:
                kernels = _load_verified(cc, f"kernels-{key.hexdigest()[:16]}.so")
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                log.warning("could not build the CPU kernels (%s): batched CPU training uses torch ops (about 2x slower)",
                            detail.strip().splitlines()[-1] if detail.strip() else e)
        _loaded["lib"] = kernels
        return kernels
