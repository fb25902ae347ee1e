"""The CPU stages (read, encode, publish) import no torch: their Ray workers start in a fraction of a
second and ~500 MB lighter than the actors beside them. Each module is imported in a fresh interpreter.
Run: pytest tests/test_stage_imports.py -q
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pipeline.sources", "pipeline.encode", "pipeline.handoff", "pipeline.sink", "ifcn.rle")


@pytest.mark.parametrize("module", STAGES)
def test_stage_module_imports_no_torch(module: str) -> None:
    code = (f"import sys; import {module}; "
            f"assert 'torch' not in sys.modules, 'importing {module} imported torch'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_check_can_fail() -> None:
    """The same check on a module that imports torch fails (so a pass above means something)."""
    code = "import sys; import pipeline.infer; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0


def _pipeline_imports() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports anywhere (module level or inside functions)."""
    import ast

    names = {p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        found = set()
        for node in ast.walk(ast.parse((ROOT / "pipeline" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                found |= {t.split(".")[0] for t in targets if t.split(".")[0] in names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                found.add(node.module.split(".")[1])
        graph[name] = found - {name}
    return graph


def test_no_import_circle_in_pipeline_even_inside_functions() -> None:
    graph = _pipeline_imports()
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            assert state.get(m) != 1, f"import circle: {' -> '.join(stack + [n, m])}"
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
