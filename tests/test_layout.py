"""The library's folders read at a glance: no folder holds more than MAX_MODULES modules side by side,
and every package opens with a docstring that says its job (and what it may import).
Run: pytest tests/test_layout.py -q
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("ifcn", "pipeline", "jobs")
MAX_MODULES = 12


def _packages() -> list[Path]:
    return sorted({p.parent for top in LIBRARY for p in (ROOT / top).rglob("__init__.py")
                   if "__pycache__" not in p.parts})


@pytest.mark.parametrize("package", _packages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_is_small_and_says_its_job(package: Path) -> None:
    modules = [p for p in package.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= MAX_MODULES, f"{package.relative_to(ROOT)}: {len(modules)} modules side by side"
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 8, f"{package.relative_to(ROOT)}/__init__.py: no docstring saying its job"
