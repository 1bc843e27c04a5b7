"""Shipped generator checkpoints: every folder under tina/checkpoints/ with a bundle.json, by name.

    fashion-mnist   Fashion-MNIST, 10 classes (alias: default)
    clipart         (when shipped) 32x32 RGB clip art

`resolve_checkpoint` turns a name, an alias or a folder path into a folder. Routing between the
shipped checkpoints (which one knows a prompt's classes) is tina/routing.py.
"""

from __future__ import annotations

from pathlib import Path

from tina.errors import TinaError

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
ALIASES = {"default": "fashion-mnist"}  # kept so that scripts written for one shipped checkpoint still run
AUTO = "auto"  # route by the prompt's classes (tina/routing.py)


def shipped() -> dict[str, Path]:
    """{name: folder} of every shipped checkpoint, sorted by name."""
    if not CHECKPOINT_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(CHECKPOINT_DIR.iterdir()) if (d / "bundle.json").is_file()}


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A folder path as it is, else a shipped name or alias ('default' -> 'fashion-mnist')."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    found = shipped()
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    if name in found:
        return found[name]
    aliases = [f"{a} (= {t})" for a, t in ALIASES.items() if t in found]
    raise TinaError(f"unknown checkpoint {str(name_or_path)!r}: not a folder, and not one of the shipped "
                    f"{sorted(found) + aliases} (or 'auto' to route by the prompt)")


def checkpoint_name(path: str | Path) -> str:
    """The shipped name of a folder, else its path as given."""
    path = Path(path)
    for name, folder in shipped().items():
        if folder.resolve() == path.resolve():
            return name
    return str(path)
