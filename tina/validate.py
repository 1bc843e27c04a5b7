"""Checks of what users hand Tina, where it enters: command-line values, metadata JSON, image specs.

Each check raises TinaError with one line that names the value (and the file and key for metadata),
so the CLI prints it and exits 2 instead of a traceback or, worse, a silently wrong model.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
from pathlib import Path

from tina.errors import TinaError

MAX_STEPS = 1000  # sampling steps; the schedulers are trained with 1000 timesteps
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_GUIDANCE = 100.0


def json_field(meta, key: str, kind: type | tuple, where, required: bool = True):
    """meta[key] checked for type: TinaError naming the file and key when it is missing or wrong."""
    if not isinstance(meta, dict):
        raise TinaError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if key not in meta:
        if required:
            raise TinaError(f"{where}: key {key!r} is missing")
        return None
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise TinaError(f"{where}: key {key!r} must be {names}, got {type(value).__name__} {value!r:.40}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors ("tina generate: error: ...; see --help"), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


# OS errors that are the user's environment, not a bug: reported as one line
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                  errno.ENAMETOOLONG, errno.EMFILE, errno.EFBIG}


def os_error_line(e: OSError) -> str | None:
    """One line for an environment error (disk full, read-only, forbidden...), None for anything else."""
    if e.errno not in USER_OS_ERRORS:
        return None
    where = f" ({e.filename})" if e.filename else ""
    hint = "; free some space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return f"{e.strerror or os.strerror(e.errno)}{where}{hint}"


def writable_folder(path: str | Path, what: str, create: bool = True) -> Path:
    """`path` as a folder Tina may write into (created if `create`); TinaError naming `what` otherwise.
    With create=False nothing is written: a run checks its output before its work, creates it after."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TinaError(f"{what}={str(path)!r} is a file, not a folder; choose another {what}")
    if not create:
        parent = next(p for p in (path, *path.parents) if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise TinaError(f"{what}={str(path)!r} cannot be written ({parent} is not a writable folder)")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinaError(f"cannot create {what}={str(path)!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise TinaError(f"{what}={str(path)!r} is not writable")
    return path


def check_image_spec(d: dict, where):
    """An ImageSpec from its dict (a manifest's, a bundle's, a model's), with sane sizes and std > 0."""
    from tina.targets import ImageSpec

    channels, size = json_field(d, "channels", int, where), json_field(d, "size", int, where)
    mean, std = json_field(d, "mean", list, where), json_field(d, "std", list, where)
    if channels not in (1, 3) or not 1 <= size <= 4096:
        raise TinaError(f"{where}: image channels must be 1 or 3 and size 1..4096, got {channels} and {size}")
    if len(mean) != channels or len(std) != channels or not all(_finite(v) for v in mean + std):
        raise TinaError(f"{where}: image mean and std need {channels} finite number(s) each, got {mean} and {std}")
    if min(std) <= 0:
        raise TinaError(f"{where}: image std must be > 0 (it divides), got {std}")
    background, crop = d.get("background"), d.get("crop", False)
    if background is not None and not (isinstance(background, int) and not isinstance(background, bool) and 0 <= background <= 255):
        raise TinaError(f"{where}: image background must be a grey level 0..255, got {background!r}")
    if not isinstance(crop, bool):
        raise TinaError(f"{where}: image crop must be true or false, got {crop!r}")
    # ImageSpec.from_dict keeps the stored background and crop (the polarity and framing user images are
    # matched to) and applies the one rule for files written before `background` existed.
    return ImageSpec.from_dict({**d, "mean": [float(v) for v in mean], "std": [float(v) for v in std]})


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling(seed: int | None = None, steps: int | None = None, guidance: float | None = None,
                   strength: float | None = None) -> None:
    """Sampling settings as given to `generate` (None = the checkpoint's default)."""
    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise TinaError(f"seed must be an integer in 0..2**63-1, got {seed}")
    if steps is not None and not (isinstance(steps, int) and 1 <= steps <= MAX_STEPS):
        raise TinaError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps}")
    if guidance is not None and not (_finite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise TinaError(f"guidance must be a finite number in 0..{MAX_GUIDANCE:g} (1 = no guidance), got {guidance}")
    if strength is not None and not (_finite(strength) and 0 < strength <= 1):
        raise TinaError(f"strength must be a number in (0, 1] (1 = sample from pure noise), got {strength}")


def check_args(args) -> None:
    """The `tina` subcommands' own arguments (delegated subcommands check theirs in their configs)."""
    if args.command == "generate":
        check_sampling(args.seed, args.steps, args.guidance, args.strength)
        if args.threads < 0:
            raise TinaError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
        if args.prompt is not None and args.classes:
            raise TinaError("give a prompt or --classes, not both")
        if args.output is not None and not args.output.strip():
            raise TinaError("--output is empty")
    elif args.command == "predict" and args.top < 1:
        raise TinaError(f"--top must be >= 1, got {args.top}")


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes, newlines) shown as escapes, safe to print."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def quoted(path: str | Path) -> str:
    """A path as one shell word (for the commands Tina prints for the user to paste)."""
    return shlex.quote(str(path))


def check_state(net, state: dict, where) -> None:
    """load_state_dict(strict) with an error naming the first missing, unexpected or misshapen tensor."""
    own = net.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or shape:
        what = (f"tensor {missing[0]!r} is missing" if missing else f"unexpected tensor {extra[0]!r}" if extra else
                f"tensor {shape[0]!r} has shape {tuple(state[shape[0]].shape)}, expected {tuple(own[shape[0]].shape)}")
        n = len(missing) + len(extra) + len(shape)
        raise TinaError(f"{where}: weights do not match the model: {what}" + (f" (and {n - 1} more)" if n > 1 else ""))
    net.load_state_dict(state, strict=True)
