"""Inference stage: a Ray Data callable class that runs `ifcn.Predictor.candidates` (the GPU half).

One actor holds one model; `__init__` loads the checkpoint once, `__call__` turns a batch of
decoded images into their top windows of every scale (forward, top-K, assembling). Pasting,
NMS and RLE run later in CPU reducer tasks (pipeline/reduce.py), so the GPU never waits on them;
on CPU-only clusters pipeline/reduce.InferAndReduceActor runs both halves in one actor instead.
Resources (num_gpus, pool size, batch size) are set in pipeline/run.py, not here.
"""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ifcn import Candidates, InferenceConfig, Predictor, load_checkpoint
from ifcn.image import one_line

from .sources import image_from_row

# Columns the stage passes through unchanged (the read stage's, minus the pixels).
PASSTHROUGH = ("image_id", "uri", "shard_id", "width", "height", "read_ms", "decode_ms")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast only where it pays (CUDA); CPU runs full precision."""
    return torch.bfloat16 if amp == "bf16" and device.type == "cuda" else None


class InferenceActor:
    """map_batches callable: pyarrow batch with `pixels` -> + infer_ms, `candidates` (npz bytes)."""

    def __init__(self, checkpoint: str, inference: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 amp: str = "none", torch_threads: int | None = None) -> None:
        if torch_threads:  # the actor's CPU share; an inherited OMP_NUM_THREADS would oversubscribe
            torch.set_num_threads(torch_threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_checkpoint(checkpoint, storage_options)
        self.predictor = Predictor(model, InferenceConfig.from_dict(inference), device, amp_dtype(amp, device))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["status", "error", "pixels", "height", "width", "uri"]).to_pylist()
        status, error, infer_ms, blobs = [], [], [], []
        for row in rows:
            blob, ms = b"", None
            if row["status"] == "ok":
                t0 = time.perf_counter()
                try:
                    image = image_from_row(row["pixels"], row["height"], row["width"])  # (H, W, 3)
                    blob = pack_candidates(self.predictor.candidates(image))
                except Exception as e:  # one bad image (e.g. CUDA OOM on a huge one) must not stop the pool
                    row["status"] = "error"
                    row["error"] = f"image {row['uri']}: inference failed ({type(e).__name__}: {one_line(e)})"
                    _release_cuda_memory()
                ms = (time.perf_counter() - t0) * 1e3
            status.append(row["status"])
            error.append(row["error"])
            infer_ms.append(ms)
            blobs.append(blob)
        out = batch.select(list(PASSTHROUGH))
        out = out.append_column("status", pa.array(status, pa.string()))
        out = out.append_column("error", pa.array(error, pa.string()))
        out = out.append_column("infer_ms", pa.array(infer_ms, pa.float32()))
        return out.append_column("candidates", pa.array(blobs, pa.large_binary()))


def pack_candidates(cands: Candidates) -> bytes:
    """Candidates -> npz bytes (no pickle) for the trip to a reducer task."""
    buf = io.BytesIO()
    np.savez(buf, **cands.to_dict())
    return buf.getvalue()


def unpack_candidates(blob: bytes) -> Candidates:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return Candidates.from_dict({k: z[k] for k in z.files})


def _release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
