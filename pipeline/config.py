"""SegmentConfig: everything one run of the batch job needs, with library defaults.

Model-side defaults come from `ifcn.InferenceConfig` and decode limits from `ifcn.image`;
the CLI (jobs/segment.py) forwards only the flags a user set, so those stay authoritative.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ifcn.config import InferenceConfig
from ifcn.image import MAX_PIXELS, MIN_SIDE

from pipeline.planning.listing import PART_ROWS

AMP_MODES = ("auto", "bf16", "none")
POSTPROCESS_MODES = ("auto", "tasks", "actor")


class SegmentError(Exception):
    """A problem with the job's inputs or settings, found before any work starts.

    Its message is one line naming the input and the fix; the CLI prints it without a traceback.
    """


class IncompleteRunError(SegmentError):
    """A run that committed what it could and left the rest (transient failures) for a re-run of
    the same command; the CLI exits 1 with its one line."""


# Calls of one GPU actor that Ray Data may run at once: two, so one batch's host work hides behind the
# next one's device work; more would only queue on the device thread while holding their batches' pixels.
CONCURRENT_CALLS = 2


@dataclass(frozen=True)
class SegmentConfig:
    """One run: where to read, where to write, which weights, how to infer and how to spread it."""

    input: str  # prefix URL (listed recursively) or a .txt / .parquet manifest of URIs
    output: str  # folder URL for the Delta tables masks/ and images/
    checkpoint: str  # ifcn checkpoint URL (ifcn.save_checkpoint / jobs.train)
    inference: InferenceConfig = InferenceConfig()
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for every URL
    shard_size: int = 128  # images per data file and resume unit: a kill loses at most ~1 shard per actor of work
    max_pixels: int = MAX_PIXELS  # larger images become error rows (checked from the header)
    min_side: int = MIN_SIDE  # smaller images become error rows
    # "auto"/"bf16": bfloat16 autocast on CUDA (~1.6x the fp32 forward; AR within 0.005); CPU runs fp32
    amp: str = "auto"
    actors: int | None = None  # None -> one per GPU; without GPUs one per CPU (CPUs // 2 with postprocess="tasks")
    gpus_per_actor: float | None = None  # None -> 1 when the cluster has GPUs, else 0 (CPU actors)
    # Images per actor call; same-size images (or all, with pad_to) share each scale's forward.
    # None -> 16 on GPU actors (the H100 forward ran 166 images/s at 16, 158 at 8), 4 on CPU.
    batch_size: int | None = None
    compile: bool = False  # torch.compile the model in GPU actors: faster forwards after a warm-up of ~1 min
    # A finished job whose error rows exceed this share of its images exits non-zero (the tables
    # are kept): a bucket of mostly broken files, or wrong credentials, should not look like success.
    max_error_rate: float = 0.1
    # Paste, binarise, NMS and run lengths always run in the inference actor, on its device. Where
    # the runs become COCO RLE strings and rows: "tasks" (CPU tasks after the actor pool, so GPUs
    # never wait on them), "actor" (inside each actor, one actor per core: what a CPU-only cluster
    # wants), or "auto" (tasks with GPU actors, actor without). Results are the same either way.
    postprocess: str = "auto"
    # Finished shards are committed in groups: at most this many per commit, and a group waits at
    # most commit_every_s for more (at 64 GPUs ~75 shards/s finish; one commit per shard cannot keep up).
    # A pair of commits costs ~1-1.5 s once a table holds ~50k files (bench/scale.py table: 212 shards/s
    # over a 10M-image run at 256 per group; at 64 per group the late commits fall to ~45 shards/s).
    commit_shards: int = 256
    # Images per listing part: an S3 prefix is snapshotted, planned and handed to the actors part by
    # part while it is still being listed (pipeline/planning/stream.py); a kill mid-listing resumes after the last part.
    listing_part: int = PART_ROWS
    prune: bool = False  # delete the rows of images whose keys are no longer listed
    # An output made with other result settings is refused unless this: then a new table version
    # replaces all its rows (the old ones stay readable by version) and every image is processed.
    overwrite: bool = False
    commit_every_s: float = 2.0
    # "module:function" that builds each actor's predictor instead of the checkpoint's model (still
    # planned and fingerprinted from --checkpoint): benchmarks and tests inject a stand-in model here
    # (bench/cpu_side.py's near-free stub); called as function(InferenceConfig, torch.device).
    predictor_factory: str | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "checkpoint"):
            if not getattr(self, name):
                raise SegmentError(f"--{name} is required (a URL or local path)")
            object.__setattr__(self, name, os.fspath(getattr(self, name)))  # pathlib.Path works too
        if self.postprocess not in POSTPROCESS_MODES:
            raise SegmentError(f"--postprocess {self.postprocess!r}: choose one of {', '.join(POSTPROCESS_MODES)}")
        if self.amp not in AMP_MODES:
            raise SegmentError(f"--amp {self.amp!r}: choose one of {', '.join(AMP_MODES)}")
        for name in ("shard_size", "max_pixels", "min_side", "batch_size", "commit_shards", "listing_part"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SegmentError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise SegmentError(f"--max-error-rate {self.max_error_rate}: must be in [0, 1]")
        if self.actors is not None and self.actors < 1:
            raise SegmentError(f"--actors {self.actors}: must be >= 1")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise SegmentError(f"--gpus-per-actor {self.gpus_per_actor}: must be >= 0")
        if self.output.rstrip("/") == self.input.rstrip("/"):
            raise SegmentError(f"--output {self.output} is the input prefix; write results to another folder")

    def result_settings(self) -> dict[str, Any]:
        """Settings that change the output rows (not resources, not the shard size): a re-run must match them."""
        return {"inference": self.inference.to_dict(),
                "max_pixels": self.max_pixels, "min_side": self.min_side, "amp": self.amp}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inference"] = self.inference.to_dict()
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        return d

    @classmethod
    def from_options(cls, input: str, output: str, checkpoint: str, **options: Any) -> "SegmentConfig":
        """Builds a config from CLI-style options; InferenceConfig fields (scales, nms_iou, ...)
        go to `inference`, the rest to SegmentConfig. Unset options keep library defaults."""
        inference_fields = set(InferenceConfig.__dataclass_fields__)
        inf = {k: v for k, v in options.items() if k in inference_fields}
        rest = {k: v for k, v in options.items() if k not in inference_fields}
        try:
            inference = replace(InferenceConfig(), **inf)
        except ValueError as e:
            raise SegmentError(str(e)) from None
        return cls(input=input, output=output, checkpoint=checkpoint, inference=inference, **rest)


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object (sorted keys): fingerprints listings and settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
