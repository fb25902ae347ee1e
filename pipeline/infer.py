"""Inference stage: a Ray Data callable class that turns decoded images into compact proposals.

One actor holds one model on one device; `__init__` loads the checkpoint once, `__call__` runs
a whole batch of images through `ifcn.Predictor.proposals`: batched forwards at every scale, top
windows, assembling, then paste, binarise, NMS and run lengths, all on the actor's device (on a
GPU actor the GPU does every per-pixel step). What leaves the actor per image is compact: per
proposal score, box, area, scale and its uncompressed run lengths (npz bytes). CPU tasks after
the pool turn those into COCO compressed RLE strings and rows (pipeline/reduce.py); on CPU-only
clusters pipeline/reduce.InferAndEncodeActor does that inside the actor instead.
Resources (num_gpus, pool size, batch size) are set in pipeline/run.py, not here.
"""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ifcn import InferenceConfig, Predictor, Proposals, load_checkpoint
from ifcn.image import one_line

from .errors import RETRY, is_transient
from .sources import image_from_row

# Columns the stage passes through unchanged (the read stage's, minus the pixels).
PASSTHROUGH = ("image_id", "uri", "shard_id", "width", "height", "read_ms", "decode_ms")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays (CUDA; "auto" = bf16 there); CPU runs full precision."""
    return torch.bfloat16 if amp in ("auto", "bf16") and device.type == "cuda" else None


class InferenceActor:
    """map_batches callable: pyarrow batch with `pixels` -> + infer_ms, postprocess_ms, `proposals` (npz bytes)."""

    def __init__(self, checkpoint: str, inference: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 amp: str = "auto", torch_threads: int | None = None, compile: bool = False,
                 checkpoint_sha256: str | None = None) -> None:
        if torch_threads:  # the actor's CPU share; an inherited OMP_NUM_THREADS would oversubscribe
            torch.set_num_threads(torch_threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_checkpoint(checkpoint, storage_options, checkpoint_sha256)  # the weights the job planned
        self.predictor = Predictor(model, InferenceConfig.from_dict(inference), device, amp_dtype(amp, device),
                                   compile=compile and device.type == "cuda")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["status", "error", "pixels", "height", "width", "uri"]).to_pylist()
        n = len(rows)
        infer_ms: list[float | None] = [None] * n
        post_ms: list[float | None] = [None] * n
        blobs = [b""] * n
        todo = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        images = {}
        for i in todo:
            try:
                images[i] = image_from_row(rows[i]["pixels"], rows[i]["height"], rows[i]["width"])  # (H, W, 3)
            except Exception as e:
                self._fail(rows[i], e)
        order = [i for i in todo if i in images]
        try:
            results = self._run([images[i] for i in order])
        except Exception:  # e.g. CUDA OOM on a huge image: run one by one, so only that image fails
            _release_cuda_memory()
            results = []
            for i in order:
                try:
                    results.extend(self._run([images[i]]))
                except Exception as e:
                    self._fail(rows[i], e)
                    _release_cuda_memory()
                    results.append(None)
        for i, res in zip(order, results):
            if res is not None:
                blobs[i], infer_ms[i], post_ms[i] = res
        out = batch.select(list(PASSTHROUGH))
        out = out.append_column("status", pa.array([r["status"] for r in rows], pa.string()))
        out = out.append_column("error", pa.array([r["error"] for r in rows], pa.string()))
        out = out.append_column("infer_ms", pa.array(infer_ms, pa.float32()))
        out = out.append_column("postprocess_ms", pa.array(post_ms, pa.float32()))
        return out.append_column("proposals", pa.array(blobs, pa.large_binary()))

    def _run(self, images: list[np.ndarray]) -> list[tuple[bytes, float, float]]:
        """Images -> (packed proposals, forward ms (the image's share of the batch), postprocess ms)."""
        if not images:
            return []
        p = self.predictor
        t0 = time.perf_counter()
        windows = p.windows(images)
        _synchronize(p.device)  # so the forward's time is not billed to the first postprocess
        share = (time.perf_counter() - t0) * 1e3 / len(images)
        out = []
        for image, groups in zip(images, windows):
            t1 = time.perf_counter()
            blob = pack_proposals(p.postprocess(groups, image.shape[:2]))
            out.append((blob, share, (time.perf_counter() - t1) * 1e3))
        return out

    @staticmethod
    def _fail(row: dict[str, Any], e: Exception) -> None:
        """CUDA and out-of-memory failures are the machine's, not the image's: left for a re-run."""
        transient = is_transient(e)
        row["status"] = RETRY if transient else "error"
        row["error"] = (f"image {row['uri']}: inference failed ({type(e).__name__}: {one_line(e)})"
                        + ("; left uncommitted for a re-run" if transient else ""))


def pack_proposals(p: Proposals) -> bytes:
    """Proposals -> npz bytes (no pickle) for the trip to an encoding task."""
    buf = io.BytesIO()
    np.savez(buf, **p.to_dict())
    return buf.getvalue()


def unpack_proposals(blob: bytes) -> Proposals:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return Proposals.from_dict({k: z[k] for k in z.files})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
