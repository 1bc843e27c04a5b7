"""Typed configs: dataclass schemas merged with a YAML file and `key=value` overrides by OmegaConf.

Unknown keys and wrong types are errors (OmegaConf structured mode), reported as TinaError so the
CLI shows one line instead of a traceback. Every run saves its resolved config beside its outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import is_dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tina.errors import TinaError

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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)


def config_hash(cfg) -> str:
    """Stable short hash of a config's values (for manifests and caches)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
