"""No import circle in ifcn/: the graph of module-level imports between ifcn's modules (read from
their source with ast; imports under `if TYPE_CHECKING:` count, imports inside function bodies do
not) has no cycle, and the inference modules import alone in a fresh interpreter.
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


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """ifcn modules `name` imports at module level."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only: no function bodies
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            targets = []
            if isinstance(sub, ast.Import):
                targets = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - sub.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in sub.names]
            for t in targets:
                while t and t not in known:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and t != "ifcn":
                    found.add(t)
    return found


def test_no_import_cycle_in_ifcn() -> None:
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert graph["ifcn.predictor"] and "ifcn.predictor" not in graph["ifcn.proposals"]


@pytest.mark.parametrize("name", ["ifcn.predictor", "ifcn.proposals", "ifcn.postprocessing", "ifcn.containers",
                                  "ifcn.boxes", "ifcn.nms", "ifcn.runs", "ifcn.ops"])
def test_module_imports_alone(name: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, cwd=ROOT, timeout=120)


def test_no_lazy_name_is_shadowed_by_a_module() -> None:
    """`ifcn.<name>` of ifcn/__init__.py's lazy names must not also be a module: importing that
    module would replace the name on the package (as `ifcn.assemble` once did)."""
    import ifcn

    clash = [name for name in ifcn.__all__ if (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()]
    assert not clash, clash
