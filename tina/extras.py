"""Optional dependencies: `pip install tina` is the runtime; training, CLIP and the demo are extras.

A module that needs an extra calls `require(extra, *modules)` before importing them, so a missing
package is one TinaError line naming the extra to install, not an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
import sys

from tina.errors import TinaError

# extra -> the import names it provides (pyproject.toml [project.optional-dependencies] lists the packages)
EXTRAS = {
    "train": ("lightning", "omegaconf", "torchvision", "tqdm"),
    "clip": ("open_clip",),
    "demo": ("gradio",),
}


def missing(modules) -> list[str]:
    """The modules that cannot be imported here; finds them without importing them."""
    out = []
    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:  # blocked on purpose (tests do this)
                out.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, what: str, modules=None) -> None:
    """TinaError naming the extra when any of its modules (default: all of them) is not installed."""
    gone = missing(EXTRAS[extra] if modules is None else modules)
    if gone:
        raise TinaError(f"{what} needs the [{extra}] extra ({', '.join(gone)} not installed): pip install 'tina[{extra}]'")
