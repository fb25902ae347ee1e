"""The actor classes the driver hands Ray Data, without importing torch in the driver.

Ray Data pickles a callable class by reference, so the driver only needs its name; importing
pipeline/stages/infer.py to get it cost the driver torch (~1 CPU-s and ~500 MB per run, measured by
bench/cpu_side.py). These stand-ins carry the real classes' names (Ray's worker titles and the
fault tests look for them) and build the real actor (pipeline/stages/infer.py) in their own worker.
"""
from __future__ import annotations

from typing import Any


class _InWorker:
    """Builds `pipeline.stages.infer.<target>` with the same arguments in the worker and forwards calls to it."""

    target = ""  # by name, not type(self).__name__: Ray Data may subclass the class it is given

    def __init__(self, **kwargs: Any) -> None:
        from pipeline.stages import infer

        self.actor = getattr(infer, self.target)(**kwargs)

    def __call__(self, batch: Any) -> Any:
        return self.actor(batch)


class InferenceActor(_InWorker):
    """pipeline.stages.infer.InferenceActor, built in its worker."""

    target = "InferenceActor"


class InferAndEncodeActor(_InWorker):
    """pipeline.stages.infer.InferAndEncodeActor, built in its worker."""

    target = "InferAndEncodeActor"
