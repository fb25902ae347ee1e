"""No import circle in the library (ifcn/, pipeline/, jobs/): the graph of imports between its
modules, read from their source with ast, counting imports under `if TYPE_CHECKING:` and inside
function bodies, has no cycle; no layer imports a layer above it (ifcn -> pipeline -> jobs); and the
inference modules import alone in a fresh interpreter.
Run: pytest tests/test_imports.py -q
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ifcn"
LAYERS = ("ifcn", "pipeline", "jobs")  # each may import the ones before it, never one after


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _lazy_names() -> dict[str, str]:
    """`from ifcn import Predictor` loads ifcn.inference.predictor (ifcn/__init__.py's PEP 562 names)."""
    import ifcn

    return {f"ifcn.{name}": f"ifcn.{module}" for name, module in ifcn._LAZY.items()}


def _imports(name: str, path: Path, known: set[str], lazy: dict[str, str]) -> set[str]:
    """The library modules `name` imports anywhere in its source: at module level, under
    TYPE_CHECKING and inside functions alike (an import in a function still ties the two modules)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            t = lazy.get(t, t)
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and t not in LAYERS:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    lazy = _lazy_names()
    return {n: _imports(n, p, set(mods), lazy) for n, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(n: str, stack: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m, stack + [m])):
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n, [n])):
            return found
    return None


def test_no_import_cycle_anywhere_even_inside_functions() -> None:
    graph = _graph()
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    assert graph["ifcn.inference.predictor"] and "ifcn.inference.predictor" not in graph["ifcn.inference.proposals"]
    assert "ifcn.models.baseline" in graph["ifcn.models.registry"] and "pipeline.tables.delta" in graph["pipeline.run"]


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """The finder itself: a circle closed only by an import inside a function is found."""
    (tmp_path / "a.py").write_text("from ifcn import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    known = {"ifcn.a", "ifcn.b"}
    graph = {f"ifcn.{m}": _imports(f"ifcn.{m}", tmp_path / f"{m}.py", known, {}) for m in "ab"}
    assert graph == {"ifcn.a": {"ifcn.b"}, "ifcn.b": {"ifcn.a"}}
    assert _cycle(graph) == ["ifcn.a", "ifcn.b", "ifcn.a"]


def test_no_upward_import() -> None:
    """ifcn never imports pipeline or jobs; pipeline never imports jobs."""
    upward = [f"{a} -> {b}" for a, bs in _graph().items() for b in bs
              if LAYERS.index(b.split(".")[0]) > LAYERS.index(a.split(".")[0])]
    assert not upward, upward


@pytest.mark.parametrize("name", ["ifcn.inference.predictor", "ifcn.inference.proposals", "ifcn.batch.postprocessing", "ifcn.batch.containers",
                                  "ifcn.ops.boxes", "ifcn.ops.nms", "ifcn.ops.runs", "ifcn.ops", "ifcn.batch.masknms", "ifcn.batch.pasteruns"])
def test_module_imports_alone(name: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, cwd=ROOT, timeout=120)


def test_no_lazy_name_is_shadowed_by_a_module() -> None:
    """`ifcn.<name>` of ifcn/__init__.py's lazy names must not also be a module: importing that
    module would replace the name on the package (as `ifcn.assemble` once did)."""
    import ifcn

    clash = [name for name in ifcn.__all__ if (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()]
    assert not clash, clash
