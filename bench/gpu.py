"""How busy does the segmentation job keep a GPU? Line rates from the matmul peak down to the job end to end.

GPU (the lent machine; one call, everything in it, under 5 minutes; see /work/shared/gpu/README.md):

    run(carry=[".gpu"], timeout_s=600, command=
      "set -o pipefail; export PYTHONUNBUFFERED=1; mkdir -p /tmp/site && python3 -m pip install -q --no-index
       --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && tar xJf .gpu/ray-slim.tar.xz -C /tmp/site
       && export PYTHONPATH=/tmp/site:$PWD || exit 3; python3 bench/gpu.py --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log")

CPU (exercises the script; the figures are not GPU figures, except the op counts of part 3):

    python bench/gpu.py [--out gpu.json]
    python bench/gpu.py --device cpu --num-images 2 --size 64x64 --max-proposals 10 --skip-counts \
        --skip-pipeline --skip-big-image --actor-seconds 0.5      # tiny: parts 1, 2 and 4 (tests/test_bench_gpu.py)

Measures, in one run on one machine (bench/README.md says more):
  1. matmul     the dense ceiling: bf16 TFLOP/s on CUDA, fp32 GFLOP/s on CPU;
  2. forward    the bare multi-scale forward (random init) on N pre-resized images, batched, bf16 autocast +
                channels_last on CUDA (torch.compile's warm-up, ~50 s, does not fit the time budget);
  3. op counts  kernel ops per image and syncs per batch of the actor's device path, forward included
                (ifcn.opcount; the paper's defaults, 480x640, vgg16_narrow, structured (bench/model.py's
                OracleHeads) and random heads; box NMS at batch 16 and 2, mask at batch 4). The same on any
                machine of the same amp (bf16 autocast on CUDA adds its casts);
  4. actor      the real pipeline.infer.InferenceActor called with read-stage batches from CONCURRENT_CALLS
                threads, as Ray Data calls a GPU actor; its first call apart, then ACTOR_BUDGET_S of steady
                calls: images/s, actor / bare forward, device busy by the actor's CUDA events (device time over
                wall time) beside nvidia-smi's utilisation, and the overlap share of the concurrent calls: of
                their host work on the calling threads, the share run while another call's device half ran on
                the device thread (ifcn.hostwork; on CPU a CPU figure: the device half is CPU work there);
  5. big image  one 4000x3000 photo through `Predictor.proposals` at the defaults: peak memory and time;
  6. job        `pipeline.run.run_segment` on generated JPEGs (random-init --backbone), box and mask NMS, images
                for JOB_STEADY_S at the actor's rate: start-up (call to the first batch out of an actor) apart
                from the steady state after each actor's WARM_BATCHES batches, whose rate and device busy
                share come from the actors' per-batch CUDA-event lines (pipeline.infer.STATS_DIR_ENV), with
                nvidia-smi sampled over the same window;
then a table per (heads, nms), and with --out the JSON after each part. On CUDA it keeps to TIME_BUDGET_S
(a job case that would not fit is skipped, saying so). Without CUDA it says so on its first line and runs
CPU equivalents at a small size (narrow backbone, 256x256, 3 scales, 100 proposals, a local Ray with 2
CPUs): they prove the script runs, they are not GPU figures (the op counts are the same).
Needs ray for part 6 only, and deltalake only where pipeline.run needs it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on sys.path, where bench/pipeline.py shadows the `pipeline` package
# (here, and in Ray's workers, which get the driver's script directory when it is on sys.path): take it off.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import ifcn  # noqa: E402
from ifcn.hostwork import overlap_share  # noqa: E402
from ifcn.opcount import OpCounter  # noqa: E402
from ifcn.transforms import image_to_tensor, normalize, resize, scaled_size  # noqa: E402
from pipeline.infer import CONCURRENT_CALLS, STATS_DIR_ENV, InferenceActor  # noqa: E402
from pipeline.encode import encode_batch  # noqa: E402

NO_CUDA_LINE = "no CUDA device: CPU equivalents at a small size; these are not GPU figures"
MATMUL_N = {"cuda": 8192, "cpu": 2048}  # large enough for the peak; 2048 fp32 takes ~0.15 s on 2 cores
MATMUL_REPS = {"cuda": 50, "cpu": 3}  # a bf16 8192^3 product takes ~1.5 ms on an H100: 50 make a sample
REPEAT = 2  # timed passes of the bare forward after one warm-up pass; the best one is kept
COUNT_SIZE = (480, 640)  # the counting setting: paper's defaults, narrow model, these images
COUNT_CASES = (("box", 16), ("box", 2), ("mask", 4))  # (nms, batch)
TARGETS = {"box": (200, 16), "mask": (600, 48)}  # issue 14: kernel ops per image, syncs per batch, at batch 16
ACTOR_BUDGET_S = {"cuda": 8.0, "cpu": 3.0}  # steady calls per actor setting, after its first call
ACTOR_CPU_BATCH = 1  # on CPU the device path takes seconds per image: one image per call
JOB_STEADY_S = {"cuda": 30.0, "cpu": 10.0}  # the job's steady window, at the actor's rate
WARM_BATCHES = 2  # each actor's first batches (cuDNN's choice per shape, first reads): start-up, not steady
CPU_RAY_CPUS = 2  # the CPU run's local Ray
JOB_STARTUP_S = 40.0  # allowance per job run for Ray Data's start and the actors' (for the time budget)
TIME_BUDGET_S = 285.0  # the whole CUDA run, so that a rerun fits a 15-minute lease
DISTINCT_IMAGES = 16  # generated scenes; more files repeat them (content beyond 16 scenes changes nothing)
ENCODE_SAMPLE = 4  # images whose proposals ifcn.encode times (a few ms each on CPU)
FALLBACK_BATCH = {"cuda": 16, "cpu": 4}  # pipeline.run's GPU_BATCH / CPU_BATCH where it cannot be imported


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py by file path, as module bench_<name> (bench/ must not go on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench_model = load_bench("model")
samplers = load_bench("gpu_samplers")


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


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def job_batch(device: str) -> int:
    """The job's own batch size (pipeline.run), or FALLBACK_BATCH where pipeline.run's imports are missing."""
    try:
        from pipeline.run import CPU_BATCH, GPU_BATCH
    except ImportError:
        return FALLBACK_BATCH[device]
    return GPU_BATCH if device == "cuda" else CPU_BATCH


def make_settings(args: argparse.Namespace) -> Settings:
    """GPU: the paper's settings; CPU: a small equivalent that runs in minutes on 2 cores."""
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py --device cuda: no CUDA device here; leave --device out or pass --device cpu")
    batch = args.batch_size or job_batch(device)
    common = dict(pipeline=not args.skip_pipeline, counts=not args.skip_counts,
                  max_job_images=args.max_job_images, actor_seconds=args.actor_seconds, big=not args.skip_big_image)
    if device == "cuda":
        return Settings("cuda", args.backbone or "vgg16", parse_size(args.size or "480x640"), ifcn.PAPER_SCALES,
                        args.num_images or 128, batch, args.max_proposals or 1000, big_size=(3000, 4000),
                        postprocess_on=("auto",), **common)
    return Settings("cpu", args.backbone or "vgg16_narrow", parse_size(args.size or "256x256"), (171, 256, 384),
                    args.num_images or 8, batch, args.max_proposals or 100, big_size=(600, 800),
                    postprocess_on=("numpy", "device"), **common)


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
    (ifcn.hostwork.overlap_share of the actor's per-call spans; device spans are the device thread's
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


# --------------------------------------------------------------------------- 6. the job end to end

def job_run(paths: list[Path], out: Path, checkpoint: Path, settings: Settings, nms: str,
            stats_dir: Path) -> dict[str, Any]:
    """One run_segment over `paths` (through a .txt manifest): start-up apart from the steady state."""
    from pipeline.config import SegmentConfig
    from pipeline.run import run_segment

    manifest = out.with_suffix(".txt")
    manifest.write_text("".join(f"{p}\n" for p in paths))
    config = SegmentConfig.from_options(input=str(manifest), output=str(out), checkpoint=str(checkpoint),
                                        scales=settings.scales, nms=nms, max_proposals=settings.max_proposals,
                                        batch_size=settings.batch_size, amp="auto")
    if settings.device == "cuda":
        torch.cuda.empty_cache()  # this process's cached blocks would count as the job's
    idle = samplers.gpu_memory_used_mib() if settings.device == "cuda" else 0.0
    start = time.time()
    with samplers.gpu_sampler(settings.device) as gpu:
        summary = run_segment(config, log=lambda line: None)
    lines = [r for r in samplers.read_batch_lines(stats_dir) if r["t"] >= start]
    steady = samplers.steady_state(lines, WARM_BATCHES)
    return {"nms": nms, "images": summary.get("images_this_run"), "wall_s": time.time() - start,
            "pipeline_images_per_s": summary.get("pipeline_images_per_s"), "actors": summary.get("actors"),
            "startup_s": lines[0]["t"] - start if lines else None, "steady": steady,
            "gpu": gpu.summary(idle, window=steady.get("window")), "gpu_all": gpu.summary(idle)}


def job_cases(settings: Settings, tmp: Path, actor_rows: list[dict[str, Any]], bare_rate: float,
              deadline: float | None, report: Callable[[str], None]) -> list[dict[str, Any]]:
    """Random-init --backbone on synthetic photos, box and mask NMS, each with enough images for
    JOB_STEADY_S at the actor's rate (at most --max-job-images)."""
    import ray

    torch.manual_seed(0)
    checkpoint = tmp / f"{settings.backbone}_random.pt"
    ifcn.save_checkpoint(ifcn.InstanceFCN(ifcn.ModelConfig(settings.backbone)), str(checkpoint))
    h, w = settings.size
    scenes = [bench_model.synthetic_scene(h, w, seed=i)[0] for i in range(DISTINCT_IMAGES)]
    rates = {r["nms"]: r["images_per_s"] for r in actor_rows
             if r["heads"] == "random" and r["postprocess_on"] in ("auto", "numpy")}
    actors = torch.cuda.device_count() if settings.device == "cuda" else CPU_RAY_CPUS  # the job's pool, about
    stats_dir = tmp / "actor_stats"
    stats_dir.mkdir()
    os.environ[STATS_DIR_ENV] = str(stats_dir)  # before ray.init: the local Ray's workers inherit it
    t0 = time.perf_counter()
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's progress lines drown the results
    ray.init(num_cpus=CPU_RAY_CPUS if settings.device == "cpu" else None, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    report(f"  ray.init: {time.perf_counter() - t0:.1f} s")
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # ray.data sets its own level when imported
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        for nms in ("box", "mask"):
            rate = rates.get(nms, 1.0)
            warm = WARM_BATCHES * settings.batch_size
            count = min(settings.max_job_images, int(actors * rate * JOB_STEADY_S[settings.device] * 1.2) + 2 * warm)
            if deadline and time.time() + JOB_STARTUP_S + count / rate / actors > deadline:
                report(f"  {nms}: skipped, {count} images at ~{rate:.0f} images/s would pass the time budget")
                continue
            paths = samplers.write_jpegs(tmp / "in", scenes, count)
            r = job_run(paths, tmp / f"out_{nms}", checkpoint, settings, nms, stats_dir)
            r["ratio_to_bare"] = (r["steady"].get("images_per_s") or 0.0) / bare_rate
            rows.append(r)
            report("  " + _job_text(r, settings))
    finally:
        ray.shutdown()
        os.environ.pop(STATS_DIR_ENV, None)
    return rows


def _job_text(r: dict[str, Any], settings: Settings) -> str:
    s, g = r["steady"], r["gpu"]
    text = (f"{r['nms']:4s}: {r['images']} images, {r['actors']} actor(s); start-up {r['startup_s'] or 0:.1f} s "
            f"(run_segment call to the first batch out of an actor)")
    if s.get("images_per_s"):
        text += (f"; steady over {s['seconds']:.1f} s ({s['images']} images): {s['images_per_s']:.2f} images/s, "
                 f"{r['ratio_to_bare']:.3f} of the bare forward, device busy {100 * s['device_busy']:.0f}% by CUDA "
                 f"events" + (f", nvidia-smi util {g['util_mean']:.0f}% mean, peak {g['mem_peak_mib']:.0f} MiB above "
                              f"idle" if g.get("samples") else ""))
        if s["seconds"] < JOB_STEADY_S[settings.device]:
            text += f" (window shorter than {JOB_STEADY_S[settings.device]:.0f} s: raise --max-job-images)"
    return text + f"; whole run {r['pipeline_images_per_s']} images/s in Ray Data, {r['wall_s']:.1f} s wall"


# --------------------------------------------------------------------------- summary

def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (heads, nms): op counts, the actor's and the job's ratios and busy shares."""
    rows = []
    for heads in ("structured", "random"):
        for nms in ("box", "mask"):
            row: dict[str, Any] = {"heads": heads, "nms": nms}
            for c in results.get("counts", []):
                if (c["heads"], c["nms"]) == (heads, nms):
                    row[f"ops/image (b{c['batch']})"] = c["kernel_ops_per_image"]
                    row[f"syncs/batch (b{c['batch']})"] = float(c["syncs_per_batch"])
            for a in results.get("actor", []):
                if (a["heads"], a["nms"]) == (heads, nms):
                    row[f"actor/bare ({a['postprocess_on']})"] = a["ratio_to_bare"]
                    row[f"actor busy % ({a['postprocess_on']})"] = 100 * a["device_busy"]
                    row[f"actor overlap % ({a['postprocess_on']})"] = 100 * a["overlap_share"]
            for j in results.get("job", []):
                if heads == "random" and j["nms"] == nms and j["steady"].get("images_per_s"):
                    row["job images/s (steady)"] = j["steady"]["images_per_s"]
                    row["job/bare"] = j["ratio_to_bare"]
                    row["job busy % (events)"] = 100 * j["steady"]["device_busy"]
                    if j["gpu"].get("samples"):
                        row["job nvidia-smi %"] = j["gpu"]["util_mean"]
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=None, help="N (default 128 on GPU, 8 on CPU)")
    ap.add_argument("--size", default=None, help="image HxW (default 480x640 on GPU, 256x256 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per forward / job actor call "
                    "(default: the job's own)")
    ap.add_argument("--max-proposals", type=int, default=None, help="default 1000 on GPU (the paper's), 100 on CPU")
    ap.add_argument("--backbone", choices=ifcn.BACKBONES, default=None,
                    help="default vgg16 on GPU, vgg16_narrow on CPU")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: CUDA where there is one; cpu: the CPU equivalents even beside a GPU")
    ap.add_argument("--actor-seconds", type=float, default=0.0,
                    help="part 4's steady calls per setting (default: 8 s on CUDA, 3 s on CPU)")
    ap.add_argument("--skip-counts", action="store_true", help="skip part 3 (op counts)")
    ap.add_argument("--skip-big-image", action="store_true", help="skip part 5 (one large photo)")
    ap.add_argument("--skip-pipeline", action="store_true", help="skip part 6 (jobs.segment end to end on Ray)")
    ap.add_argument("--max-job-images", type=int, default=20_000, help="cap on the images of one job run")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after every part)")
    args = ap.parse_args(argv)
    started = time.time()
    settings = make_settings(args)
    device = settings.device
    deadline = started + TIME_BUDGET_S if device == "cuda" else None
    results: dict[str, Any] = {"settings": asdict(settings)}

    def report(line: str) -> None:
        print(line, flush=True)

    def save() -> None:
        results["elapsed_s"] = time.time() - started
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=str))

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        report(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA "
               f"{torch.version.cuda}; {os.cpu_count()} CPUs; python {platform.python_version()}")
        torch.backends.cudnn.benchmark = True  # as Predictor sets it: few shapes, each benchmarked once
    else:
        report(NO_CUDA_LINE)
        report(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
               f"python {platform.python_version()}")
    h, w = settings.size
    report(f"settings: {settings.backbone}, {settings.num_images} images of {h}x{w}, scales {list(settings.scales)}, "
           f"job batch {settings.batch_size}, actor batch {settings.actor_batch}, max {settings.max_proposals} "
           f"proposals, amp {str(settings.amp).replace('torch.', '')}, postprocess paths {list(settings.postprocess_on)}")

    report("1. matmul")
    mm = results["matmul"] = matmul_peak(device)
    unit, scale = ("TFLOP/s", 1.0) if device == "cuda" else ("GFLOP/s", 1e3)
    report(f"  {mm['dtype']} {mm['reps']} x {mm['n']}^2: {mm['tflops'] * scale:.1f} {unit}")
    save()

    report("2. bare forward")
    torch.manual_seed(0)
    model = ifcn.InstanceFCN(ifcn.ModelConfig(settings.backbone)).to(device, memory_format=torch.channels_last).eval()
    scene, instances = bench_model.synthetic_scene(h, w)
    images = [scene] * settings.num_images  # one scene: OracleHeads' maps are made for it
    flops = forward_flops(model, scene, settings.inference(), device)
    batches = resized_batches(images, settings.inference(), settings.batch_size, device)
    fwd = results["forward"] = bare_forward(model, batches, len(images), settings.amp, device, flops)
    fwd["gflop_per_image"] = flops / 1e9
    report(f"  {flops / 1e9:.1f} GFLOP per image; {fwd['images_per_s']:.2f} images/s, {fwd['tflops'] * scale:.2f} "
           f"{unit} ({fwd['tflops'] / mm['tflops']:.3f} of matmul); warm-up pass {fwd['warmup_s']:.1f} s")
    del batches
    save()

    if settings.counts:
        report(f"3. op counts of the actor's device path (forward included; paper's defaults, {COUNT_SIZE[0]}x"
               f"{COUNT_SIZE[1]}, vgg16_narrow, amp {str(settings.amp).replace('torch.', '')})")
        results["counts"] = op_counts(settings, report)
        save()
    else:
        report("3. op counts: skipped (--skip-counts)")

    report(f"4. the actor alone (pipeline.infer.InferenceActor, {CONCURRENT_CALLS} calls at once)")
    nets = {"structured": BatchedOracle(bench_model.OracleHeads(model, instances)), "random": model}
    results["actor"] = actor_settings(settings, nets, images, fwd["images_per_s"], report)
    save()

    if settings.big:
        report(f"5. bounded memory: one {settings.big_size[0]}x{settings.big_size[1]} synthetic photo "
               f"(postprocess on the device)")
        results["big_image"] = big_image(model, settings, report)
        save()
    else:
        report("5. bounded memory: skipped (--skip-big-image)")
    if device == "cuda":
        torch.cuda.empty_cache()

    if settings.pipeline:
        report(f"6. jobs.segment end to end (pipeline.run.run_segment, local Ray"
               f"{', 2 CPUs' if device == 'cpu' else ''}; {settings.backbone} random init)")
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            results["job"] = job_cases(settings, Path(tmp), results["actor"], fwd["images_per_s"], deadline, report)
        save()
    else:
        report("6. jobs.segment: skipped (--skip-pipeline)")

    report(f"summary (ratios to the bare forward of the same model; {time.time() - started:.0f} s in all)")
    results["summary"] = summary_rows(results)
    samplers.print_table(results["summary"], report)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
