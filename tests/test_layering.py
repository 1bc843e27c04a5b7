"""The packages import one way: runtime (tina) <- tina.training <- zoo_builder, evaluation <- serve, CLI.

Every import statement counts, including those inside functions: a late import hides a dependency
from a reader but not from pip (a runtime user without the training extras would hit it). The CLI
(tina/cli.py) and the `python -m` entry points (__main__.py) sit above every package, so they may
import any of them. Also: `import tina` pulls in no training, plotting or diffusers library and
changes no process-wide setting.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tina", "zoo_builder", "evaluation", "serve")
ENTRY_POINTS = {"tina.cli", "tina.__main__"}  # plus every *.__main__
# Third-party packages only training, evaluation or the demo may use (the [train], [clip], [demo] extras).
HEAVY = ("lightning", "webdataset", "timm", "open_clip", "matplotlib", "gradio")
TIMM_TARGET = "tina.targets"  # the one runtime place that may import timm at module level: the timm target


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = all_modules()


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of a module, resolved to our module names."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try)) for n in ast.walk(s)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from tina import errors` imports the module tina.errors; `from tina.x import f` imports tina.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out += [(t, id(node) in top) for t in targets]
    return out


def layer(name: str) -> str:
    if name in ENTRY_POINTS or name.endswith(".__main__") or name == "__main__":
        return "entry"
    if name == "tina.training" or name.startswith("tina.training."):
        return "training"
    return name.split(".")[0]  # tina (runtime), zoo_builder, evaluation, serve


def ours(target: str) -> str | None:
    """The module of ours that `target` names (itself or its nearest parent package), or None if third-party."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


# What each layer may import from the others (itself always).
ALLOWED = {
    "tina": {"tina"},
    "training": {"tina", "training"},
    "zoo_builder": {"tina", "training", "zoo_builder"},
    "evaluation": {"tina", "training", "zoo_builder", "evaluation"},
    "serve": {"tina", "training", "zoo_builder", "evaluation", "serve"},
    "entry": {"tina", "training", "zoo_builder", "evaluation", "serve", "entry"},
}


def test_every_import_points_down_the_layers():
    wrong = []
    for name in MODULES:
        for target, _ in imports(name):
            mod = ours(target)
            if mod is not None and layer(mod) not in ALLOWED[layer(name)]:
                wrong.append(f"{name} ({layer(name)}) imports {mod} ({layer(mod)})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_runtime_imports_no_training_or_demo_library_at_module_level():
    wrong = []
    for name in MODULES:
        if layer(name) != "tina":
            continue
        for target, at_top in imports(name):
            root = target.split(".")[0]
            if at_top and root in HEAVY and not (root == "timm" and name.startswith(TIMM_TARGET)):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "the runtime must import these lazily or not at all:\n" + "\n".join(wrong)


def test_there_are_no_import_cycles_between_modules():
    graph = {name: {m for t, _ in imports(name) if (m := ours(t)) and m != name} for name in MODULES}
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    graph = {n: {m for m in deps if not (n.startswith(m + ".") and m in MODULES)} for n, deps in graph.items()}
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layering_check_sees_function_level_imports(tmp_path):
    """The checker itself: an import hidden inside a function is still an arrow."""
    assert ("tina.training.train", False) in imports("tina.cli")  # cmd_train imports it lazily
    assert layer("tina.training.datasets.core") == "training" and layer("tina.sample") == "tina"
    assert layer("evaluation.__main__") == "entry"


def test_import_tina_loads_no_heavy_library_and_changes_no_setting():
    code = (
        "import json, os, sys; before = dict(os.environ); "
        "import tina; from tina import Tina, load_generated; import tina.text, tina.export, tina.images; "
        "print(json.dumps({'modules': sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY + ('diffusers', 'transformers', 'sentence_transformers')!r}), "
        "'env': {k: v for k, v in os.environ.items() if before.get(k) != v}}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["modules"] == [], f"`import tina` loaded {got['modules']}"
    assert got["env"] == {}, f"`import tina` changed the environment: {got['env']}"
