"""Distributed InstanceFCN batch job on Ray Data: sources, stages, sinks.

`pipeline.read_output(url)` reads a job's committed results (pipeline/tables/output.py);
`pipeline.InstanceFCNTransform` is the model step as a Ray Data map_batches transform (pipeline/stages/transform.py)."""
from __future__ import annotations

from typing import Any


def read_output(*args: Any, **kwargs: Any):
    """See pipeline.tables.output.read_output (imported on first use: `import pipeline` stays light)."""
    from pipeline.tables.output import read_output as read

    return read(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "InstanceFCNTransform":  # torch is imported on first use only
        from pipeline.stages.transform import InstanceFCNTransform

        return InstanceFCNTransform
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
