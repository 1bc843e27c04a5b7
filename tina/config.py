"""Typed configs: dataclass schemas merged with a YAML file and `key=value` overrides by OmegaConf.

Unknown keys and wrong types are errors (OmegaConf structured mode), reported as TinaError so the
CLI shows one line instead of a traceback. Every run saves its resolved config beside its outputs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import TypeVar

from tina.atomic import atomic_write_text
from tina.errors import TinaError
from tina.extras import require

require("train", "typed configs (tina.config)", ["omegaconf"])  # before the imports it guards

import yaml  # noqa: E402 - omegaconf installs PyYAML
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

T = TypeVar("T")


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> T:
    """schema defaults <- YAML file <- `a.b=value` overrides; returns a plain dataclass instance."""
    assert is_dataclass(schema)
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            p = Path(path)
            if p.is_dir():
                raise TinaError(f"config file {str(p)!r} is a folder; pass a YAML file (e.g. configs/train/fashion_mnist.yaml)")
            if not p.is_file():
                raise TinaError(f"config file {str(p)!r} does not exist")
            try:
                loaded = OmegaConf.load(p)
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise TinaError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
            except OSError as e:
                raise TinaError(f"cannot read config file {str(p)!r}: {e.strerror}") from None
            if not isinstance(loaded, DictConfig):
                raise TinaError(f"config file {str(p)!r} must hold key: value pairs, not a list")
            cfg = OmegaConf.merge(cfg, loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise TinaError(f"overrides must look like key=value, got {bad}")
            try:
                dot = OmegaConf.from_dotlist(list(overrides))
            except yaml.YAMLError as e:
                raise TinaError(f"bad override value: {str(e).splitlines()[0]}") from None
            cfg = OmegaConf.merge(cfg, dot)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise TinaError(f"bad config ({path or 'defaults'}): {msg}") from None
    except (ValueError, TypeError) as e:  # raised by a schema's __post_init__ checks
        raise TinaError(f"bad config ({path or 'defaults'}): {e}") from None
    return obj


def at_least(section: str, **values) -> None:
    """For __post_init__ checks: `at_least("trainer", max_steps=(self.max_steps, 1))` -> ValueError naming the key."""
    for key, (value, low) in values.items():
        if not value >= low:
            raise ValueError(f"{section}.{key} must be >= {low}, got {value}")


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def config_keys(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, the comment beside the field) for every leaf of a dataclass schema.

    Read from the dataclasses themselves, so `--help` cannot drift from what load_config accepts."""
    comments = _field_comments(schema)
    out = []
    for f in fields(schema):
        default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else MISSING
        if is_dataclass(default):
            out += config_keys(type(default), f"{prefix}{f.name}.")
            continue
        shown = "(required)" if default is MISSING else repr(default)
        out.append((prefix + f.name, str(f.type), shown, comments.get(f.name, "")))
    return out


def config_help(schema: type) -> str:
    """The keys of a config schema as an argparse epilog: one `key: type = default  # comment` line each."""
    rows = config_keys(schema)
    width = max(len(f"{k}: {t} = {d}") for k, t, d, _ in rows)
    lines = [(f"  {f'{k}: {t} = {d}':<{width}}" + (f"  # {c}" if c else "")).rstrip() for k, t, d, c in rows]
    return "config keys (set in the YAML file or as key=value):\n" + "\n".join(lines)


def _field_comments(schema: type) -> dict[str, str]:
    """name -> the comment beside a field, or else the comment block just above it (its first sentence)."""
    try:
        lines = inspect.getsource(schema).splitlines()
    except (OSError, TypeError):  # no source (e.g. a frozen build): keys without comments
        return {}
    out, above = {}, []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.+))?$", text)
        if m and not text.startswith(("def ", "class ", "@")):
            comment = m.group(2) or " ".join(above).split(". ")[0]
            out.setdefault(m.group(1), comment.strip())
        above = []
    return out


def config_hash(cfg) -> str:
    """Stable short hash of a config's values (for manifests and caches)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
