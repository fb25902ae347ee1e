"""What bench/gpu.py samples beside the work it times: nvidia-smi's utilisation and memory, peak
memory (torch's, this process's RSS), the inference actors' own per-batch device time (CUDA
events); the inputs it feeds (read-stage batches, JPEG files); and its table printer.

Loaded by file path from bench/gpu.py (bench/ must not go on sys.path: bench/pipeline.py would
shadow the `pipeline` package).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil
import pyarrow as pa
import torch

UTIL_PERIOD_MS = 200  # nvidia-smi sampling period: a batch of 16 forwards takes ~100 ms on an H100
BUSY_PERCENT = 80  # a sample counts as "busy" at this utilisation or above


class GpuSampler:
    """GPU utilisation (%) and memory.used (MiB) every UTIL_PERIOD_MS, from `nvidia-smi -lms` in a
    subprocess (pynvml in a thread where nvidia-smi is missing); no samples without either.

    utilization.gpu is the share of time any kernel ran: thousands of tiny kernels read as busy.
    The actors' CUDA events (steady_state) say how long the device worked on each batch."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), util %, memory MiB)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", str(UTIL_PERIOD_MS)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self._thread = threading.Thread(target=self._poll_nvml, daemon=True)
        self._thread.start()
        return self

    def _read_smi(self) -> None:
        for line in self._proc.stdout:
            parsed = parse_smi_line(line)
            if parsed:
                self.samples.append((time.time(), *parsed))

    def _poll_nvml(self) -> None:
        try:
            import pynvml
        except ImportError:
            return
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.is_set():
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            self.samples.append((time.time(), float(util), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20))
            time.sleep(UTIL_PERIOD_MS / 1e3)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self, idle_mib: float = 0.0, window: tuple[float, float] | None = None) -> dict[str, Any]:
        """Mean utilisation and share of samples >= BUSY_PERCENT (within `window`, time.time() bounds, if
        given), peak memory above idle over all samples."""
        if not self.samples:
            return {"samples": 0}
        stamp, util, mem = (np.array(col) for col in zip(*self.samples))
        inside = (stamp >= window[0]) & (stamp <= window[1]) if window else np.ones(len(util), bool)
        if not inside.any():
            return {"samples": 0}
        return {"samples": int(inside.sum()), "util_mean": float(util[inside].mean()),
                "busy_share": float((util[inside] >= BUSY_PERCENT).mean()), "mem_peak_mib": float(mem.max() - idle_mib)}


def parse_smi_line(line: str) -> tuple[float, float] | None:
    """'37, 1234' -> (37.0, 1234.0); None for '[N/A]' fields or anything else."""
    try:
        util, mem = (float(v) for v in line.strip().split(","))
    except ValueError:
        return None
    return util, mem


def gpu_memory_used_mib() -> float:
    """memory.used now (MiB), 0 where nvidia-smi cannot say: the idle level a job's peak is measured from."""
    if not shutil.which("nvidia-smi"):
        return 0.0
    out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
    parsed = parse_smi_line(out)
    return parsed[1] if parsed else 0.0


@contextlib.contextmanager
def gpu_sampler(device: str) -> Iterator[GpuSampler]:
    """A GpuSampler on CUDA, a no-op (no samples) on CPU."""
    sampler = GpuSampler()
    if device != "cuda":
        yield sampler
        return
    with sampler:
        yield sampler


class RssPeak:
    """Peak growth of this process's RSS while the block runs (sampled every 20 ms): the CPU's stand-in
    for max_memory_allocated."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.growth_mib = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "RssPeak":
        self._base = self._peak = self.me.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.me.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.me.memory_info().rss)
        self.growth_mib = (self._peak - self._base) / 2**20


def read_batch_lines(folder: Path) -> list[dict[str, Any]]:
    """Every actor's per-batch lines (pipeline.stages.infer.STATS_DIR_ENV: one JSON object per batch, `t` its
    time.time() at the end of the device half, `pid`, `images`, `device_ms`), oldest first."""
    lines = [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()
             if line.strip()]
    return sorted(lines, key=lambda r: r["t"])


def steady_state(lines: list[dict[str, Any]], warm_batches: int) -> dict[str, Any]:
    """Rate and device busy share after each actor's first `warm_batches` batches (cuDNN's kernel choice,
    first reads), up to the last batch: images done in that window over its length; device busy = the
    actors' CUDA-event device time in it over the window, per actor."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for r in lines:
        by_pid.setdefault(r["pid"], []).append(r)
    warm = [batches[min(warm_batches, len(batches)) - 1]["t"] for batches in by_pid.values() if batches]
    if not warm:
        return {"batches": 0}
    start, end = max(warm), lines[-1]["t"]
    inside = [r for r in lines if start < r["t"] <= end]
    span = end - start
    return {"batches": len(inside), "actors": len(by_pid), "window": (start, end), "seconds": span,
            "images": sum(r["images"] for r in inside),
            "images_per_s": sum(r["images"] for r in inside) / span if span > 0 else None,
            # a batch's device work ends at its `t`; the part of it before the window is left out
            "device_busy": (sum(min(r["device_ms"] / 1e3, r["t"] - start) for r in inside) / span / len(by_pid)
                            if span > 0 else None)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def read_stage_batch(images: list[np.ndarray]) -> pa.Table:
    """What the read stage hands an inference actor: one decoded image per row."""
    n = len(images)
    return pa.table({"image_id": [str(i) for i in range(n)], "uri": [f"mem://{i}" for i in range(n)],
                     "shard_id": ["0"] * n, "width": pa.array([im.shape[1] for im in images], pa.int32()),
                     "height": pa.array([im.shape[0] for im in images], pa.int32()),
                     "read_ms": pa.array([0.0] * n, pa.float32()), "decode_ms": pa.array([0.0] * n, pa.float32()),
                     "status": ["ok"] * n, "error": pa.array([None] * n, pa.string()),
                     "pixels": pa.array([im.tobytes() for im in images], pa.large_binary())})


def write_jpegs(folder: Path, scenes: list[np.ndarray], count: int) -> list[Path]:
    """count JPEG files cycling through the scenes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    encoded = []
    for scene in scenes:
        buf = io.BytesIO()
        Image.fromarray(scene).save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(encoded[i % len(encoded)])
        paths.append(path)
    return paths


def print_table(rows: list[dict[str, Any]], report: Callable[[str], None]) -> None:
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if any(r.get(c) is not None for r in rows)]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    report("  " + "  ".join(c.rjust(wd) for c, wd in zip(columns, widths)))
    for row in cells:
        report("  " + "  ".join(v.rjust(wd) for v, wd in zip(row, widths)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)
