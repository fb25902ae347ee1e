"""bench/gpu.py's measurements inside its own process, parts 1 to 5: the matmul peak, the bare
multi-scale forward, the op counts of the actor's device path (ifcn.tools.opcount), the inference actor
alone under concurrent calls (images/s, device busy by its CUDA events, the overlap share of its
calls' host work: ifcn.batch.hostwork) and one large image's peak memory; and the run's Settings, which
every part reads. Each part returns JSON-ready rows and reports a line per row.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

import ifcn
from ifcn.batch.hostwork import overlap_share
from ifcn.tools.opcount import OpCounter
from ifcn.ops.transforms import image_to_tensor, normalize, resize, scaled_size
from pipeline.stages.encode import encode_batch
from pipeline.stages.infer import CONCURRENT_CALLS, InferenceActor

# bench/gpu.py loads this module by file path (bench/ must not go on sys.path: bench/pipeline.py would
# shadow the `pipeline` package), after the bench modules it uses, with the repository on sys.path.
bench_model, samplers = sys.modules["bench_model"], sys.modules["bench_gpu_samplers"]

MATMUL_N = {"cuda": 8192, "cpu": 2048}  # large enough for the peak; 2048 fp32 takes ~0.15 s on 2 cores
MATMUL_REPS = {"cuda": 50, "cpu": 3}  # a bf16 8192^3 product takes ~1.5 ms on an H100: 50 make a sample
REPEAT = 2  # timed passes of the bare forward after one warm-up pass; the best one is kept
COUNT_SIZE = (480, 640)  # the counting setting: paper's defaults, narrow model, these images
COUNT_CASES = (("box", 16), ("box", 2), ("mask", 4))  # (nms, batch)
TARGETS = {"box": (200, 16), "mask": (600, 48)}  # issue 14: kernel ops per image, syncs per batch, at batch 16
ACTOR_BUDGET_S = {"cuda": 8.0, "cpu": 3.0}  # steady calls per actor setting, after its first call
ACTOR_CPU_BATCH = 1  # on CPU the device path takes seconds per image: one image per call
ENCODE_SAMPLE = 4  # images whose proposals ifcn.encode times (a few ms each on CPU)


@dataclass(frozen=True)
class Settings:
    device: str  # "cuda" or "cpu"
    backbone: str
    size: tuple[int, int]  # image H, W
    scales: tuple[int, ...]
    num_images: int
    batch_size: int  # the job's images per actor call
    max_proposals: int
    pipeline: bool
    counts: bool
    big_size: tuple[int, int]  # the bounded-memory check's image H, W
    postprocess_on: tuple[str, ...]  # Predictor paths timed in part 4
    max_job_images: int
    actor_seconds: float = 0.0  # part 4's steady calls per setting (0: ACTOR_BUDGET_S of the device)
    big: bool = True  # part 5

    @property
    def amp(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device == "cuda" else None  # what the job's amp="auto" picks

    @property
    def actor_batch(self) -> int:
        return self.batch_size if self.device == "cuda" else ACTOR_CPU_BATCH

    def inference(self, nms: str = "box") -> ifcn.InferenceConfig:
        return ifcn.InferenceConfig(scales=self.scales, nms=nms, max_proposals=self.max_proposals)


class BatchedOracle(nn.Module):
    """OracleHeads for batches on any device: OracleHeads computes its maps once per input size on the
    host for batch 1; Predictor batches same-size images and runs on the GPU, so the maps are copied to
    the input's device once and expanded to the batch (the network itself still runs on the whole batch)."""

    def __init__(self, oracle: nn.Module) -> None:
        super().__init__()
        self.oracle, self.config = oracle, oracle.config
        self._on_device: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, objectness = self.oracle(images)  # whole forward; maps (1, k*k, h, w), (1, 1, h, w) on the host
        key = (tuple(images.shape[-2:]), scores.dtype, images.device)
        if key not in self._on_device:
            self._on_device[key] = (scores.to(images.device), objectness.to(images.device))
        scores, objectness = self._on_device[key]
        n = images.shape[0]
        return scores.expand(n, -1, -1, -1), objectness.expand(n, -1, -1, -1)


# --------------------------------------------------------------------------- 1. matmul

def matmul_peak(device: str) -> dict[str, Any]:
    """The dense ceiling: bf16 on CUDA (tensor cores), fp32 on CPU."""
    n, reps = MATMUL_N[device], MATMUL_REPS[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b)
        samplers.sync(device)

    seconds = bench_model.best_time(run, REPEAT)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "reps": reps, "seconds": seconds,
            "tflops": 2.0 * n**3 * reps / seconds / 1e12}


# --------------------------------------------------------------------------- 2. bare forward

def resized_batches(images: list[np.ndarray], config: ifcn.InferenceConfig, batch: int,
                    device: str) -> list[torch.Tensor]:
    """Every scale's inputs, resized and normalised ahead of time, in batches of same-size images
    (the images here are all one size), channels_last as Predictor feeds them."""
    out = []
    bases = [image_to_tensor(image, device) for image in images]
    for short in config.scales:
        inputs = [normalize(resize(b, scaled_size(*b.shape[-2:], short, config.max_size))) for b in bases]
        for lo in range(0, len(inputs), batch):
            out.append(torch.cat(inputs[lo:lo + batch]).contiguous(memory_format=torch.channels_last))
    return out


def forward_flops(model: nn.Module, image: np.ndarray, config: ifcn.InferenceConfig, device: str) -> float:
    """Conv FLOPs (2 x MACs) of one image's forward at every scale."""
    base = image_to_tensor(image, device)
    inputs = [normalize(resize(base, scaled_size(*image.shape[:2], s, config.max_size))).contiguous(
        memory_format=torch.channels_last) for s in config.scales]
    return bench_model.conv_flops(model, inputs)


def bare_forward(model: Callable, batches: list[torch.Tensor], images: int, amp: torch.dtype | None, device: str,
                 flops_per_image: float, warmups: int = 1) -> dict[str, Any]:
    """model(x) over the pre-resized batches of `images` images; the first `warmups` passes (cuDNN's kernel
    choice per shape, or torch.compile's compilation) are timed apart, then the best of REPEAT passes."""

    def run() -> None:
        ctx = torch.autocast(device, dtype=amp) if amp else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            for x in batches:
                model(x)
        samplers.sync(device)

    warm = [bench_model.timed(run)[0] for _ in range(warmups)]
    seconds = min(bench_model.timed(run)[0] for _ in range(REPEAT))
    return {"images": images, "seconds": seconds, "warmup_s": sum(warm), "images_per_s": images / seconds,
            "tflops": flops_per_image * images / seconds / 1e12}


# --------------------------------------------------------------------------- 3. op counts

def op_counts(settings: Settings, report: Callable[[str], None]) -> list[dict[str, Any]]:
    """COUNT_CASES with structured and random heads: what the actor's device path launches and waits for."""
    device = settings.device
    torch.manual_seed(0)
    narrow = ifcn.InstanceFCN(ifcn.ModelConfig("vgg16_narrow")).to(device, memory_format=torch.channels_last).eval()
    scene, instances = bench_model.synthetic_scene(*COUNT_SIZE)
    nets = {"structured": BatchedOracle(bench_model.OracleHeads(narrow, instances)), "random": narrow}
    rows = []
    for heads, net in nets.items():
        ifcn.Predictor(net, ifcn.InferenceConfig(), device, settings.amp).windows([scene])  # the oracle's maps, cuDNN
        for nms, batch in COUNT_CASES:
            predictor = ifcn.Predictor(net, ifcn.InferenceConfig(nms=nms), device, settings.amp,
                                       postprocess_on="device")
            t0 = time.perf_counter()
            with OpCounter() as counter:
                out = predictor.proposals([scene] * batch)
            c = counter.counts
            ops, syncs = TARGETS[nms]
            rows.append({"heads": heads, "nms": nms, "batch": batch, "kernel_ops_per_image": c.kernel_ops / batch,
                         "syncs_per_batch": c.syncs, "sync_ops": c.sync_ops, "host_reads": c.host_reads,
                         "target_at_16": f"<= {ops} / <= {syncs}", "proposals": float(np.mean([len(p) for p in out])),
                         "seconds": time.perf_counter() - t0, "top_ops": counter.by_op.most_common(5),
                         "postprocess_gb_per_image": sum(v for k, v in counter.bytes_by_stage.items()
                                                         if k != "windows") / batch / 1e9,
                         "gb_per_image_by_stage": {k: v / batch / 1e9 for k, v in counter.bytes_by_stage.items()}})
            r = rows[-1]
            report(f"  {heads:10s} {nms:4s} batch {batch:2d}: {r['kernel_ops_per_image']:8.0f} kernel ops / image, "
                   f"{c.syncs:6d} syncs / batch ({c.sync_ops} ops + {c.host_reads} host reads); target at batch 16 "
                   f"{r['target_at_16']}; {r['proposals']:.0f} proposals; postprocess writes "
                   f"{r['postprocess_gb_per_image']:.2f} GB / image (target box <= 1, mask <= 4); "
                   f"counted in {r['seconds']:.0f} s")
    return rows


# --------------------------------------------------------------------------- 4. the actor alone

def actor_alone(actor: InferenceActor, batch: pa.Table, budget_s: float, device: str) -> dict[str, Any]:
    """One call (start-up, timed apart), then CONCURRENT_CALLS threads calling until budget_s has passed.
    Rate = images done / wall; device busy = the actor's CUDA-event device time / wall; overlap = of the
    steady calls' host work on their calling threads (stacking, the postprocess's host planning, the
    Arrow columns), the share during which another call's device half ran on the device thread
    (ifcn.batch.hostwork.overlap_share of the actor's per-call spans; device spans are the device thread's
    launching and waiting, not GPU time; on CPU the device half is CPU work too)."""
    samplers.reset_peak(device)
    t0 = time.perf_counter()
    first = actor(batch)
    first_s = time.perf_counter() - t0
    if first.column("status").to_pylist() != ["ok"] * batch.num_rows:
        raise RuntimeError(f"actor failed: {first.column('error').to_pylist()}")
    before = (actor.stats.images, actor.stats.device_ms, actor.stats.forward_ms, actor.stats.postprocess_ms)
    actor.call_spans = []  # the steady calls' host and device spans
    tables: list[pa.Table] = []
    with samplers.gpu_sampler(device) as gpu:
        start = time.time()

        def caller() -> None:
            while time.time() - start < budget_s:
                tables.append(actor(batch))

        threads = [threading.Thread(target=caller) for _ in range(CONCURRENT_CALLS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end = time.time()
    wall = end - start
    calls, actor.call_spans = actor.call_spans, None
    host_s = sum(b - a for spans in calls for kind, a, b in spans if kind == "host")
    images = actor.stats.images - before[0]
    device_s, forward_s = (actor.stats.device_ms - before[1]) / 1e3, (actor.stats.forward_ms - before[2]) / 1e3
    post_s = (actor.stats.postprocess_ms - before[3]) / 1e3  # spans: concurrent calls' interleave (DeviceStats)
    sample = pa.concat_tables(tables).slice(0, ENCODE_SAMPLE)
    t1 = time.perf_counter()
    proposals = encode_batch(sample).column("proposals").to_pylist()
    encode_ms = 1e3 * (time.perf_counter() - t1) / sample.num_rows
    return {"images": images, "first_call_s": first_s, "seconds": wall, "images_per_s": images / wall,
            "device_busy": device_s / wall, "forward_ms": 1e3 * forward_s / images,
            "postprocess_ms": 1e3 * post_s / images, "encode_ms": encode_ms,
            "proposals": float(np.mean([len(p) for p in proposals])), "peak_mib": samplers.peak_mib(device),
            "gpu": gpu.summary(window=(start, end)), "calls": len(calls), "host_ms": 1e3 * host_s / max(1, images),
            "overlap_share": overlap_share(calls)}


def actor_settings(settings: Settings, nets: dict[str, nn.Module], images: list[np.ndarray],
                   bare_rate: float, report: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every (heads, nms, postprocess path) setting of part 4."""
    device = settings.device
    batch = samplers.read_stage_batch(images[:settings.actor_batch])
    rows = []
    for heads, net in nets.items():
        for nms in ("box", "mask"):
            for on in settings.postprocess_on:
                predictor = ifcn.Predictor(net, settings.inference(nms), device, settings.amp, postprocess_on=on)
                r = actor_alone(InferenceActor.of(predictor), batch, settings.actor_seconds or ACTOR_BUDGET_S[device],
                                device)
                r.update(heads=heads, nms=nms, postprocess_on=on, batch=batch.num_rows,
                         ratio_to_bare=r["images_per_s"] / bare_rate)
                rows.append(r)
                report(f"  {heads:10s} {nms:4s} {on:6s}: {r['images_per_s']:8.2f} images/s ({r['images']} images in "
                       f"{r['seconds']:.1f} s after a first call of {r['first_call_s']:.1f} s)  actor/bare "
                       f"{r['ratio_to_bare']:.3f}  device busy {100 * r['device_busy']:.0f}% (events); per image: "
                       f"forward {r['forward_ms']:.1f} ms + postprocess {r['postprocess_ms']:.1f} ms on the device; "
                       f"encode {r['encode_ms']:.1f} ms (CPU); {r['proposals']:.0f} proposals"
                       + _gpu_text(r["gpu"], r["peak_mib"]))
                report(f"    overlap of the {CONCURRENT_CALLS} concurrent calls: {100 * r['overlap_share']:.0f}% of the "
                       f"calls' host work ({r['host_ms']:.1f} ms / image on calling threads, {r['calls']} calls) ran "
                       f"while another call's device half ran on the device thread"
                       + ("" if device == "cuda" else " (CPU figures: the device half is CPU work here)"))
    return rows


def _gpu_text(gpu: dict[str, Any], peak: float | None) -> str:
    text = f"; peak {peak:.0f} MiB allocated" if peak is not None else ""
    if gpu.get("samples"):
        text += (f"; nvidia-smi util {gpu['util_mean']:.0f}% mean, {100 * gpu['busy_share']:.0f}% of samples >= "
                 f"{samplers.BUSY_PERCENT}%")
    return text


# --------------------------------------------------------------------------- 5. bounded memory

def big_image(model: nn.Module, settings: Settings, report: Callable[[str], None]) -> list[dict[str, Any]]:
    """One large synthetic photo through Predictor.proposals at the paper's defaults, structured and random
    heads; on CUDA the structured run is repeated (the first pays for cuDNN's choice of kernels at batch 1).
    The CPU run keeps its own scales and proposals and runs only random heads (each run takes ~12 s there)."""
    device = settings.device
    h, w = settings.big_size
    scene, instances = bench_model.synthetic_scene(h, w, seed=1)
    config = ifcn.InferenceConfig() if device == "cuda" else settings.inference()
    nets: dict[str, nn.Module] = {"random": model}
    if device == "cuda":
        nets = {"structured": BatchedOracle(bench_model.OracleHeads(model, instances)), **nets}
    rows = []
    for heads, net in nets.items():
        predictor = ifcn.Predictor(net, config, device, settings.amp, postprocess_on="device")
        for attempt in range(2 if device == "cuda" and heads == "structured" else 1):
            samplers.reset_peak(device)
            rss = samplers.RssPeak()
            with rss:
                seconds, _ = bench_model.timed(lambda: predictor.proposals([scene]))
            r = {"heads": heads, "run": attempt + 1, "size": [h, w], "seconds": seconds, "peak_mib": samplers.peak_mib(device),
                 "rss_growth_mib": rss.growth_mib}
            rows.append(r)
            mem = (f"peak {r['peak_mib']:.0f} MiB GPU memory allocated" if r["peak_mib"] is not None
                   else f"process RSS +{r['rss_growth_mib']:.0f} MiB at peak")
            report(f"  {h}x{w} {heads:10s} run {attempt + 1}: {seconds:.2f} s, {mem}")
    return rows
