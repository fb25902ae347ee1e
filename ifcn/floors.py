"""The oldest torch and ray this code runs on, checked when the modules that need them load.

pyproject.toml states the same floors (tests/test_device_faults.py holds them equal); an older
install would otherwise fail deep inside a job with an unrelated-looking error:
- torch 2.6: `torch.nonzero_static` on CUDA (ifcn.batch.masknms' and maskpairs' mask-NMS rounds; before, CPU only);
- ray 2.60: `ActorPoolStrategy(max_concurrent_calls_per_actor=..., enable_true_multi_threading=...)`
  (pipeline/graph.py: two concurrent calls per GPU actor on real threads; added in 2026).
"""
from __future__ import annotations

import importlib.metadata
import re

FLOORS = {"torch": (2, 6), "ray": (2, 60)}


class DependencyTooOldError(ImportError):
    """An installed package older than this code needs (one line: the package, both versions, the fix)."""


def version_tuple(text: str) -> tuple[int, int]:
    """'2.13.0+cpu' -> (2, 13)."""
    found = re.match(r"(\d+)\.(\d+)", text)
    if found is None:
        raise ValueError(f"cannot read the version {text!r}; expected 'MAJOR.MINOR...'")
    return int(found.group(1)), int(found.group(2))


def require(package: str) -> None:
    """Raises DependencyTooOldError if the installed `package` is below FLOORS[package]."""
    need = FLOORS[package]
    have = importlib.metadata.version(package)
    if version_tuple(have) < need:
        floor = ".".join(map(str, need))
        raise DependencyTooOldError(f"{package} {have} is installed but instancefcn needs {package}>={floor}; "
                                    f"run: pip install '{package}>={floor}' (or -c constraints.txt)")
