"""Structure the project promises: no import cycles in the core, small core modules, no ComfyUI in the core."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO, SHARED

CORE = REPO / "colorflow_core"
#: Core modules allowed past ~400 lines, each with its reason written at its top.
LONG_MODULE_LINES = 400


def _imports(path: Path, package: str) -> set[str]:
    """The `colorflow_core` modules `path` imports, at any depth (in-function imports count)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    parent = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parent
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (base + "." + node.module if node.module else base) if node.level else node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(package))
    return found


def test_the_core_import_graph_has_no_cycle():
    modules = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {t for t in _imports(path, "colorflow_core") if t in modules and t != name}
             for name, path in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle back into the package.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and modules[t].name == "__init__.py")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_shared_cycle_tool_agrees():
    tool = SHARED / "tools" / "import_cycles.py"
    if not tool.is_file():
        pytest.skip(f"{tool} not found")
    out = subprocess.run([sys.executable, str(tool), str(CORE)], capture_output=True, text=True, check=False)
    assert "0 import cycles" in out.stdout, out.stdout


def test_core_modules_are_small_or_say_why():
    for path in CORE.rglob("*.py"):
        lines = path.read_text().count("\n")
        if lines > LONG_MODULE_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "Why this module is long" in doc, f"{path.relative_to(REPO)}: {lines} lines and no reason at its top"


def test_the_core_never_imports_comfyui():
    for path in CORE.rglob("*.py"):
        found = {n for n in _imports(path, "comfy") | _imports(path, "folder_paths")}
        assert not found, f"{path.relative_to(REPO)} imports {found}"
