"""Inference stage: a Ray Data callable class that turns decoded images into compact proposals.

One actor holds one model on one device; `__init__` loads the checkpoint once, `__call__` runs
a whole batch of images through the Predictor: batched forwards at every scale, top windows,
assembling, then paste, binarise, NMS and run lengths, all on the actor's device (on a GPU actor
the GPU does every per-pixel step). What leaves the actor per image is compact: per proposal
score, box, area, scale and its uncompressed run lengths, as Arrow columns (pipeline/stages/handoff.py).
CPU tasks after the pool turn those into COCO compressed RLE strings and rows (pipeline/stages/encode.py);
on CPU-only clusters InferAndEncodeActor (below) does that inside the actor instead.

Keeping the device busy: a call's device half (`_device`) runs on the actor's one device thread
(its own CUDA stream), its host halves (pixels, viewed in the batch's Arrow buffer, stacked into
pinned memory before: their one copy in the actor; the postprocess's host planning in between, which
the device half yields (ifcn.batch.hostwork: paste plans, mask NMS rounds, the per-image arrays); column
building, table building and, in InferAndEncodeActor, encoding after) on the calling thread. When
Ray Data runs CONCURRENT_CALLS calls of one actor at once, one batch's host work overlaps the
next batch's device work; with one call at a time (CPU actors, tests) the same code runs in order.
Resources (num_gpus, pool size, batch size, concurrency) are set in pipeline/graph.py, not here.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ifcn import InferenceConfig, Predictor, Proposals, load_checkpoint
from ifcn.batch.hostwork import Span, Steps, drive
from ifcn.floors import require
from ifcn.ops.transforms import Stacks, stack_images

from pipeline.config import CONCURRENT_CALLS  # noqa: F401  (tests and bench/gpu.py import it from here)
from pipeline.errors import RETRY, classify
from pipeline.tables.hooks import pause_point

from .encode import encode_batch
from .handoff import proposals_at, proposals_chunks
from .sink import StageWriter

require("ray")  # concurrent calls per actor on real threads (ifcn/floors.py)

# Columns the stage passes through unchanged (the read stage's, minus the pixels).
PASSTHROUGH = ("image_id", "uri", "shard_id", "width", "height", "read_ms", "decode_ms")
# Benchmarks (bench/gpu.py) set this to a folder: each actor appends one JSON line per batch to <folder>/<pid>.jsonl
# (its time, images, CUDA-event device time), so a job's steady rate and device busy share can be read off.
STATS_DIR_ENV = "IFCN_ACTOR_STATS_DIR"
# CUDA errors that leave the process's CUDA context unusable ("sticky"): every later kernel fails too,
# so only a new process recovers. The actor exits; Ray Data restarts it (its actors have
# max_restarts=-1) and retries the batch, instead of this actor turning every later image into a retry row.
STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "misaligned address", "illegal instruction", "uncorrectable ECC error", "CUDA error: unknown error")
EXIT_DEVICE_LOST = 75  # the actor's exit status when its device is lost (EX_TEMPFAIL)


def sticky_cuda_error(e: BaseException) -> bool:
    """An error after which this process's CUDA context is lost (STICKY_CUDA_ERRORS)."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in STICKY_CUDA_ERRORS)


def _exit_for_restart(e: BaseException) -> None:
    """Ends the actor's process at once (no cleanup: the CUDA context cannot run any), so Ray restarts it."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"ifcn actor pid {os.getpid()}: the CUDA context is lost ({type(e).__name__}: {first}); exiting with "
          f"status {EXIT_DEVICE_LOST} so Ray restarts the actor and retries its batch", file=sys.stderr, flush=True)
    os._exit(EXIT_DEVICE_LOST)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays (CUDA; "auto" = bf16 there); CPU runs full precision."""
    return torch.bfloat16 if amp in ("auto", "bf16") and device.type == "cuda" else None


@dataclass
class DeviceStats:
    """What the device half did since the actor started: batches, images, and the device's time.

    A batch's span runs from a CUDA event recorded on the actor's stream before its first op to one
    after its last (on CPU, the host's clock: there the device half is the host's work); forward_ms /
    postprocess_ms split the spans at the end of the forwards. Concurrent calls interleave their
    device segments (ifcn.batch.hostwork), so their spans overlap: device_ms counts each moment once (a
    span's part past the latest end counted so far, on one timeline since the actor's first mark).
    Gaps between batches (host work not overlapped, an empty input queue) are not in it; stalls
    inside a batch are."""

    batches: int = 0
    images: int = 0
    device_ms: float = 0.0
    forward_ms: float = 0.0
    postprocess_ms: float = 0.0
    _until: float = float("-inf")  # the latest span end counted (ms on the actor's timeline)

    def add(self, images: int, start_ms: float, forwarded_ms: float, end_ms: float) -> float:
        """A batch with marks at start, end of the forwards and end (ms on the actor's timeline).
        Returns the device time it adds (its span less what earlier spans counted)."""
        busy = max(0.0, end_ms - max(start_ms, self._until))
        self._until = max(self._until, end_ms)
        self.batches += 1
        self.images += images
        self.device_ms += busy
        self.forward_ms += forwarded_ms - start_ms
        self.postprocess_ms += end_ms - forwarded_ms
        return busy


class DeviceClock:
    """Marks on the device's timeline: CUDA events on the current stream (no host wait), else the host's
    clock; times from `epoch` (a mark of an earlier clock: one timeline per actor; None: this clock's
    first mark, which becomes its epoch)."""

    def __init__(self, device: torch.device, epoch: Any = None) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.epoch = epoch

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        if self.epoch is None:
            self.epoch = self.marks[0]

    def times_ms(self) -> list[float]:
        """Each mark's milliseconds since the epoch (waits for the last one on CUDA)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.epoch.elapsed_time(m) for m in self.marks]
        return [(m - self.epoch) * 1e3 for m in self.marks]


class InferenceActor:
    """map_batches callable: pyarrow batch with `pixels` -> + infer_ms, postprocess_ms, `proposals` (handoff.HANDOFF_TYPE)."""

    def __init__(self, checkpoint: str, inference: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 amp: str = "auto", torch_threads: int | None = None, compile: bool = False,
                 checkpoint_sha256: str | None = None, predictor_factory: str | None = None) -> None:
        if torch_threads:  # the actor's CPU share; an inherited OMP_NUM_THREADS would oversubscribe
            torch.set_num_threads(torch_threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if predictor_factory:  # SegmentConfig.predictor_factory: a stand-in model (benchmarks, tests)
            module, _, name = predictor_factory.partition(":")
            self._start(getattr(importlib.import_module(module), name)(InferenceConfig.from_dict(inference), device))
            return
        model = load_checkpoint(checkpoint, storage_options, checkpoint_sha256)  # the weights the job planned
        self._start(Predictor(model, InferenceConfig.from_dict(inference), device, amp_dtype(amp, device),
                              compile=compile and device.type == "cuda"))

    @classmethod
    def of(cls, predictor: Predictor) -> "InferenceActor":
        """An actor around a ready Predictor (benchmarks and tests: any model, no checkpoint)."""
        actor = cls.__new__(cls)
        actor._start(predictor)
        return actor

    def _start(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.stats = DeviceStats()
        self._epoch: Any = None  # the actor's first device mark (DeviceClock)
        folder = os.environ.get(STATS_DIR_ENV)
        self._stats_file = os.path.join(folder, f"{os.getpid()}.jsonl") if folder else None
        cuda = predictor.device.type == "cuda"
        self._stream = torch.cuda.Stream(predictor.device) if cuda else None
        # one thread issues every device op, in call order, on the actor's stream
        self._device_thread = ThreadPoolExecutor(1, "ifcn-device", initializer=_enter_stream, initargs=(self._stream,))
        # per call, its ("host" | "device", start, end) spans (ifcn.batch.hostwork), when a benchmark sets a list here
        self.call_spans: list[list[Span]] | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        pause_point("actor_batch")
        spans: list[Span] | None = None if self.call_spans is None else []
        t0 = time.perf_counter()
        rows = batch.select(["status", "error", "height", "width", "uri"]).to_pylist()  # small: no pixels
        pixels = _row_chunks(batch.column("pixels"))  # no combine_chunks: it would copy every image's pixels
        n = len(rows)
        infer_ms: list[float | None] = [None] * n
        post_ms: list[float | None] = [None] * n
        results: list[Proposals | None] = [None] * n
        images = {}
        for i, r in enumerate(rows):
            if r["status"] != "ok":
                continue
            try:
                images[i] = pixels_at(*pixels[i], r["height"], r["width"])  # (H, W, 3) read-only view
            except Exception as e:
                self._fail(r, e)
        order = list(images)
        _span(spans, t0)
        for i, res in zip(order, self._infer(rows, [images[i] for i in order], order, spans)):
            if res is not None:
                results[i], infer_ms[i], post_ms[i] = res
        t0 = time.perf_counter()
        column = proposals_chunks(results)  # the batch's proposals as Arrow columns, no per-proposal objects
        share = (time.perf_counter() - t0) * 1e3 / max(1, len(order))
        out = batch.select(list(PASSTHROUGH))
        out = out.append_column("status", pa.array([r["status"] for r in rows], pa.string()))
        out = out.append_column("error", pa.array([r["error"] for r in rows], pa.string()))
        out = out.append_column("infer_ms", pa.array(infer_ms, pa.float32()))
        out = out.append_column("postprocess_ms", pa.array([m + share if m is not None else None for m in post_ms],
                                                           pa.float32()))
        out = out.append_column("proposals", column)
        if spans is not None:
            _span(spans, t0)
            self.call_spans.append(spans)
        return out

    def _infer(self, rows: list[dict[str, Any]], images: list[np.ndarray], order: list[int],
               spans: list[Span] | None = None) -> list[tuple[Proposals, float, float] | None]:
        """The batch's device half; if it fails (e.g. CUDA OOM on a huge image), image by image, so only
        the images that fail again fail (None). A sticky CUDA error ends the process (Ray restarts it)."""
        if not images:
            return []
        try:  # stacked (into page-locked memory on CUDA) here: the device thread only queues device work
            t0 = time.perf_counter()
            stacks = stack_images(images, self.predictor.device)
            _span(spans, t0)
            return drive(self._device(images, stacks), self._device_thread, spans)
        except Exception as e:
            if sticky_cuda_error(e):  # no image by image: every one would fail the same way
                _exit_for_restart(e)
            _release_cuda_memory()
        results: list[tuple[Proposals, float, float] | None] = []
        for i, image in zip(order, images):
            try:
                results.extend(drive(self._device([image]), self._device_thread, spans))
            except Exception as e:
                if sticky_cuda_error(e):
                    _exit_for_restart(e)
                self._fail(rows[i], e)
                _release_cuda_memory()
                results.append(None)
        return results

    def _device(self, images: list[np.ndarray], stacks: Stacks | None = None
                ) -> Steps[list[tuple[Proposals, float, float]]]:
        """Images -> (proposals, forward ms (the image's share of the batch), postprocess ms (its share)),
        a device routine (ifcn.batch.hostwork): its device segments run on the device thread, the host
        planning it yields on the calling thread (`_infer` drives it). The one place that calls the Predictor: forwards, then the
        postprocess of every image in one `Predictor.postprocess_steps` (one chain of ops for the batch)."""
        p = self.predictor
        clock = DeviceClock(p.device, self._epoch)
        clock.mark()
        self._epoch = clock.epoch  # one timeline for the actor: concurrent calls' spans compare
        windows = p.windows(images, stacks)
        clock.mark()
        sizes = [image.shape[:2] for image in images]
        split = getattr(p, "postprocess_steps", None)  # None: a stand-in (bench/cpu_side.py) with no host half
        proposals = (yield from split(windows, sizes)) if split else p.postprocess_batch(windows, sizes)
        clock.mark()  # proposals are on the host by now: the device has run every op before this mark
        start, forwarded, end = clock.times_ms()
        forward_ms, post_ms = forwarded - start, end - forwarded
        n = len(images)
        busy = self.stats.add(n, start, forwarded, end)
        if self._stats_file:
            with open(self._stats_file, "a") as f:
                f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "images": n, "device_ms": busy,
                                    "forward_ms": forward_ms, "postprocess_ms": post_ms}) + "\n")
        return [(r, forward_ms / n, post_ms / n) for r in proposals]

    @staticmethod
    def _fail(row: dict[str, Any], e: Exception) -> None:
        """CUDA and out-of-memory failures are the machine's, not the image's: a 'retry' row."""
        transient, reason = classify(e)
        row["status"] = RETRY if transient else "error"
        row["error"] = f"image {row['uri']}: inference failed ({reason})" + ("; left for a re-run" if transient else "")


def unpack_proposals(column: pa.Array, i: int, image_size: tuple[int, int]) -> Proposals:
    """Row i of the actor's `proposals` column as Proposals (tests and benchmarks compare them)."""
    return Proposals.from_dict({"image_size": np.asarray(image_size), **proposals_at(column, i)})


def _span(spans: list[Span] | None, t0: float) -> None:
    """Records host work on the calling thread from t0 to now (when spans are recorded)."""
    if spans is not None:
        spans.append(("host", t0, time.perf_counter()))


def _row_chunks(column: pa.ChunkedArray) -> list[tuple[pa.Array, int]]:
    """(chunk, index within it) of each row of a chunked column."""
    return [(chunk, i) for chunk in column.chunks for i in range(len(chunk))]


def pixels_at(pixels: pa.Array, i: int, height: int, width: int) -> np.ndarray:
    """Row i of the read stage's `pixels` (binary) column as a read-only (height, width, 3) uint8 view
    of the Arrow buffer: no copy."""
    offsets = np.frombuffer(pixels.buffers()[1], np.int64 if pa.types.is_large_binary(pixels.type) else np.int32)
    start, stop = offsets[pixels.offset + i], offsets[pixels.offset + i + 1]
    if stop - start != height * width * 3:
        raise ValueError(f"pixels: {stop - start} bytes for a {height}x{width} RGB image ({height * width * 3} expected)")
    data = np.frombuffer(pixels.buffers()[2], np.uint8, count=height * width * 3, offset=int(start))
    return data.reshape(height, width, 3)


def _enter_stream(stream: torch.cuda.Stream | None) -> None:
    """The device thread's start: its ops go to the actor's stream (the current stream is per thread)."""
    if stream is not None:
        torch.cuda.set_stream(stream)


def _release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class InferAndEncodeActor(InferenceActor):
    """Inference and encoding in one actor, for CPU-only clusters (`--postprocess actor`, the default there).

    With no GPU to keep busy, a separate encoding stage only leaves the actor's core idle while
    tasks queue; one actor per core doing everything uses every core.
    """

    def __init__(self, *args: Any, stage: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = StageWriter(**stage)  # {"output", "storage_options", "run_id"}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage(encode_batch(super().__call__(batch)))
