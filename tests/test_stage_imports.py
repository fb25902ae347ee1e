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
STAGES = ("pipeline.planning.sources", "pipeline.stages.read", "pipeline.stages.encode", "pipeline.stages.handoff", "pipeline.stages.sink", "ifcn.ops.rle")


@pytest.mark.parametrize("module", STAGES)
def test_stage_module_imports_no_torch(module: str) -> None:
    code = (f"import sys; import {module}; "
            f"assert 'torch' not in sys.modules, 'importing {module} imported torch'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_check_can_fail() -> None:
    """The same check on a module that imports torch fails (so a pass above means something)."""
    code = "import sys; import pipeline.stages.infer; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
