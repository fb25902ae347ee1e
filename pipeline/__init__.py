"""Distributed InstanceFCN batch job on Ray Data: sources, stages, sinks.

`pipeline.read_output(url)` reads a job's committed results (pipeline/output.py)."""
from __future__ import annotations

from typing import Any


def read_output(*args: Any, **kwargs: Any):
    """See pipeline.output.read_output (imported on first use: `import pipeline` stays light)."""
    from .output import read_output as read

    return read(*args, **kwargs)
