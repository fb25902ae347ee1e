"""How busy does the segmentation job keep a GPU? Line rates from the matmul peak down to the job end to end.

GPU (the lent machine; one call, everything in it; see /work/shared/gpu/README.md):

    run(carry=[".gpu"], timeout_s=600, command=
      "set -o pipefail; export PYTHONUNBUFFERED=1; mkdir -p /tmp/site && python3 -m pip install -q --no-index
       --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && tar xJf .gpu/ray-slim.tar.xz -C /tmp/site
       && export PYTHONPATH=/tmp/site:$PWD || exit 3; python3 bench/gpu.py --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log")

CPU (exercises the script; the figures are not GPU figures):

    python bench/gpu.py [--out gpu.json]          # ~4 min on 2 cores

Measures, in one run on one machine (in this order):
  1. matmul     torch.mm of large square matrices: bf16 TFLOP/s on CUDA, fp32 GFLOP/s on CPU (the ceiling);
  2. forward    the bare multi-scale forward of InstanceFCN (random init) on N pre-resized images at every
                scale, batched (--batch-size), bf16 autocast + channels_last on CUDA; images/s and TFLOP/s
                (conv FLOPs counted by bench/model.py's conv_flops);
  3. actor      `Predictor.windows` + `Predictor.postprocess` (what pipeline.infer.InferenceActor runs per
                batch: forwards, top windows, assembling, then paste / NMS / run lengths on the device) over
                the same images, for --nms box and mask, with structured heads (bench/model.py's OracleHeads:
                the maps a trained model gives on the synthetic scene) and random heads (noisy ~0.5 masks,
                the costly case); images/s, actor / bare forward, ms per image in windows vs postprocess,
                peak GPU memory, GPU busy share; plus `ifcn.encode` (COCO RLE strings, CPU tasks) per image.
                Each setting stops after ACTOR_BUDGET_S (at least one image): some take seconds per image;
  4. big image  one 4000x3000 synthetic photo through `Predictor.proposals` at the paper's defaults
                (structured and random heads): peak GPU memory (torch.cuda.max_memory_allocated) and time
                (on CPU: 600x800, random heads, the process's peak RSS growth instead);
  5. job        `pipeline.run.run_segment` on generated JPEGs (a random-init checkpoint saved with
                ifcn.save_checkpoint: random heads; and checkpoints/narrow_synth.pt on ifcn.data.synth scenes:
                the "trained" stand-in for structured heads, since a checkpoint cannot carry OracleHeads), nms
                box and mask: summary["pipeline_images_per_s"] and wall, end-to-end / bare forward of the same
                model, the GPU's busy share (nvidia-smi every 200 ms: mean, share of samples >= 80%), peak GPU
                memory (nvidia-smi memory.used above the idle level) and the actors' peak RSS. Each run gets as
                many images as the actor alone did in PIPELINE_BUDGET_S (1 to N);
  6. compiled   the bare forward again under torch.compile, its warm-up reported apart (last, so a run cut
                off by the time limit loses only it);
and ends with a table of the ratios per (heads, nms). With --out it writes everything as JSON (after each part,
so a run cut off by a time limit keeps what it measured).

Without CUDA it says so on its first line and runs CPU equivalents at a small size (narrow backbone, 256x256
images, 3 scales, 100 proposals, N=8, no compile, both postprocess paths in part 3, a local Ray with 2 CPUs):
that proves the script runs; its numbers are not GPU figures. Tests never assert on anything this prints.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import psutil
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on sys.path, where bench/pipeline.py shadows the `pipeline` package
# (here, and in Ray's workers, which get the driver's script directory when it is on sys.path): take it off.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import ifcn  # noqa: E402
from ifcn.data.synth import SynthConfig, render_image  # noqa: E402
from ifcn.transforms import image_to_tensor, normalize, resize, scaled_size  # noqa: E402
from pipeline.run import CPU_BATCH, GPU_BATCH  # noqa: E402  (the job's own batch sizes)

NO_CUDA_LINE = "no CUDA device: CPU equivalents at a small size; these are not GPU figures"
MATMUL_N = {"cuda": 8192, "cpu": 2048}  # large enough for the peak; 2048 fp32 takes ~0.15 s on 2 cores
MATMUL_REPS = {"cuda": 50, "cpu": 3}  # a bf16 8192^3 product takes ~1.5 ms on an H100: 50 make a sample
REPEAT = 2  # timed passes of the bare forward after one warm-up pass; the best one is kept
ACTOR_BUDGET_S = {"cuda": 20.0, "cpu": 3.0}  # per actor setting: mask NMS of random heads takes seconds per image
PIPELINE_BUDGET_S = {"cuda": 30.0, "cpu": 20.0}  # images per job run ~ this x the actor's rate (1 to --num-images)
DISTINCT_IMAGES = 16  # generated scenes; more files repeat them (a scene takes ~0.2 s to make, content
# beyond 16 scenes does not change the cost per image)
ENCODE_SAMPLE = 4  # images whose proposals ifcn.encode times (a few ms each on CPU)
UTIL_PERIOD_MS = 200  # nvidia-smi sampling period: a batch of 16 forwards takes ~100 ms on an H100
BUSY_PERCENT = 80  # a sample counts as "busy" at this utilisation or above
TRAINED_CHECKPOINT = REPO / "checkpoints" / "narrow_synth.pt"


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py by file path, as module bench_<name> (bench/ must not go on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench_model = load_bench("model")


@dataclass(frozen=True)
class Settings:
    device: str  # "cuda" or "cpu"
    backbone: str
    size: tuple[int, int]  # image H, W
    scales: tuple[int, ...]
    num_images: int
    batch_size: int
    max_proposals: int
    compile: bool
    pipeline: bool
    big_size: tuple[int, int]  # the bounded-memory check's image H, W
    postprocess_on: tuple[str, ...]  # Predictor paths timed in part 3

    @property
    def amp(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device == "cuda" else None  # what the job's amp="auto" picks

    def inference(self, nms: str = "box") -> ifcn.InferenceConfig:
        return ifcn.InferenceConfig(scales=self.scales, nms=nms, max_proposals=self.max_proposals)


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def make_settings(args: argparse.Namespace) -> Settings:
    """GPU: the paper's settings; CPU: a small equivalent that runs in minutes on 2 cores."""
    cuda = torch.cuda.is_available()
    if cuda:
        return Settings("cuda", args.backbone or "vgg16", parse_size(args.size or "480x640"), ifcn.PAPER_SCALES,
                        args.num_images or 256, args.batch_size or GPU_BATCH, args.max_proposals or 1000,
                        not args.no_compile, not args.skip_pipeline, (3000, 4000), ("auto",))
    return Settings("cpu", args.backbone or "vgg16_narrow", parse_size(args.size or "256x256"), (171, 256, 384),
                    args.num_images or 8, args.batch_size or CPU_BATCH, args.max_proposals or 100,
                    False, not args.skip_pipeline, (600, 800), ("numpy", "device"))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


class GpuSampler:
    """GPU utilisation (%) and memory.used (MiB) every UTIL_PERIOD_MS, from `nvidia-smi -lms` in a
    subprocess (pynvml in a thread where nvidia-smi is missing); no samples without either."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time.perf_counter(), util %, memory MiB)
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
                self.samples.append((time.perf_counter(), *parsed))

    def _poll_nvml(self) -> None:
        try:
            import pynvml
        except ImportError:
            return
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.is_set():
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            self.samples.append((time.perf_counter(), float(util), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20))
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

    def summary(self, idle_mib: float = 0.0) -> dict[str, Any]:
        """Mean utilisation over all samples and over the active span (first to last sample > 0%: leaves
        out the actors' start-up and the shut-down), its length, share of samples >= BUSY_PERCENT, peak
        memory above idle."""
        if not self.samples:
            return {"samples": 0}
        stamp, util, mem = (np.array(col) for col in zip(*self.samples))
        on = np.flatnonzero(util > 0)
        active = util[on[0]:on[-1] + 1] if len(on) else util[:0]
        return {"samples": len(util), "util_mean": float(util.mean()),
                "util_mean_active": float(active.mean()) if len(active) else 0.0,
                "active_s": float(stamp[on[-1]] - stamp[on[0]] + UTIL_PERIOD_MS / 1e3) if len(on) else 0.0,
                "busy_share": float((util >= BUSY_PERCENT).mean()), "mem_peak_mib": float(mem.max() - idle_mib),
                "mem_idle_mib": idle_mib}


def parse_smi_line(line: str) -> tuple[float, float] | None:
    """'37, 1234' -> (37.0, 1234.0); None for '[N/A]' fields or anything else."""
    try:
        util, mem = (float(v) for v in line.strip().split(","))
    except ValueError:
        return None
    return util, mem


def gpu_memory_used_mib() -> float:
    """memory.used now (MiB), 0 where nvidia-smi cannot say: the idle level the job's peak is measured from."""
    if not shutil.which("nvidia-smi"):
        return 0.0
    out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
    parsed = parse_smi_line(out)
    return parsed[1] if parsed else 0.0


@contextlib.contextmanager
def gpu_sampler(device: str):
    """A GpuSampler on CUDA, a no-op (no samples) on CPU."""
    sampler = GpuSampler()
    if device != "cuda":
        yield sampler
        return
    with sampler:
        yield sampler


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
        sync(device)

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
        sync(device)

    warm = [bench_model.timed(run)[0] for _ in range(warmups)]
    seconds = min(bench_model.timed(run)[0] for _ in range(REPEAT))
    return {"images": images, "seconds": seconds, "warmup_s": sum(warm), "images_per_s": images / seconds,
            "tflops": flops_per_image * images / seconds / 1e12}


# --------------------------------------------------------------------------- 3. actor alone

def actor_alone(predictor: ifcn.Predictor, images: list[np.ndarray], batch: int, budget_s: float) -> dict[str, Any]:
    """What InferenceActor._run does per batch: windows() (+ sync), then postprocess() per image.

    Stops once budget_s has passed (after at least one image). Rate = 1 / (the batch's windows time
    per image + postprocess time per image), which holds for a partly done batch too."""
    device = predictor.device.type
    win_s = post_s = 0.0
    windowed, results = 0, []
    reset_peak(device)
    start = time.perf_counter()
    for lo in range(0, len(images), batch):
        chunk = images[lo:lo + batch]
        t0 = time.perf_counter()
        groups = predictor.windows(chunk)
        sync(device)
        win_s += time.perf_counter() - t0
        windowed += len(chunk)
        for image, g in zip(chunk, groups):
            t1 = time.perf_counter()
            results.append(predictor.postprocess(g, image.shape[:2]))  # numpy out: synced
            post_s += time.perf_counter() - t1
            if time.perf_counter() - start > budget_s:
                break
        if time.perf_counter() - start > budget_s:
            break
    win_ms, post_ms = 1e3 * win_s / windowed, 1e3 * post_s / len(results)
    sample = results[:ENCODE_SAMPLE]
    t2 = time.perf_counter()
    for p in sample:
        ifcn.encode(p)
    encode_ms = 1e3 * (time.perf_counter() - t2) / len(sample)
    return {"images": len(results), "windows_ms": win_ms, "postprocess_ms": post_ms,
            "images_per_s": 1e3 / (win_ms + post_ms), "encode_ms": encode_ms,
            "proposals": float(np.mean([len(p) for p in results])), "peak_mib": peak_mib(device)}


def actor_settings(settings: Settings, nets: dict[str, nn.Module], images: list[np.ndarray],
                   bare_rate: float, report: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every (heads, nms, postprocess path) setting of part 3."""
    device = settings.device
    for heads, net in nets.items():  # warm-up: cuDNN / oneDNN kernel choice per shape, the oracle's maps
        ifcn.Predictor(net, settings.inference(), device, settings.amp).windows(images[:settings.batch_size])
    if device == "cuda":  # first use of every postprocess kernel, on the cheap (structured) masks
        for nms in ("box", "mask"):
            ifcn.Predictor(nets["structured"], settings.inference(nms), device, settings.amp).proposals(images[:1])
    rows = []
    for heads, net in nets.items():
        for nms in ("box", "mask"):
            for on in settings.postprocess_on:
                predictor = ifcn.Predictor(net, settings.inference(nms), device, settings.amp, postprocess_on=on)
                with gpu_sampler(device) as gpu:
                    r = actor_alone(predictor, images, settings.batch_size, ACTOR_BUDGET_S[device])
                r.update(heads=heads, nms=nms, postprocess_on=on, ratio_to_bare=r["images_per_s"] / bare_rate,
                         gpu=gpu.summary())
                rows.append(r)
                report(f"  {heads:10s} {nms:4s} {on:6s}: {r['images_per_s']:8.2f} images/s ({r['images']} images)  "
                       f"actor/bare {r['ratio_to_bare']:.3f}  per image: windows {r['windows_ms']:.1f} ms + "
                       f"postprocess {r['postprocess_ms']:.1f} ms; encode {r['encode_ms']:.1f} ms (CPU); "
                       f"{r['proposals']:.0f} proposals" + _gpu_text(r["gpu"], r["peak_mib"]))
    return rows


def _gpu_text(gpu: dict[str, Any], peak: float | None) -> str:
    text = f"; peak {peak:.0f} MiB allocated" if peak is not None else ""
    if gpu.get("samples"):
        text += f"; GPU busy {gpu['util_mean']:.0f}% mean, {100 * gpu['busy_share']:.0f}% of samples >= {BUSY_PERCENT}%"
    return text


# --------------------------------------------------------------------------- 5. the job end to end

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


def job_run(paths: list[Path], out: Path, checkpoint: Path, settings: Settings, nms: str,
            process_sampler_cls: type) -> dict[str, Any]:
    """One run_segment over `paths` (through a .txt manifest), sampling the GPU and every process."""
    import pyarrow.dataset as pads

    from pipeline.config import SegmentConfig
    from pipeline.run import run_segment

    manifest = out.with_suffix(".txt")
    manifest.write_text("".join(f"{p}\n" for p in paths))
    config = SegmentConfig.from_options(input=str(manifest), output=str(out), checkpoint=str(checkpoint),
                                        scales=settings.scales, nms=nms, max_proposals=settings.max_proposals,
                                        batch_size=settings.batch_size, amp="auto")
    lines: list[str] = []
    if settings.device == "cuda":
        torch.cuda.empty_cache()  # this process's cached blocks would count as the job's
    idle = gpu_memory_used_mib() if settings.device == "cuda" else 0.0
    earlier = previous_actors()
    procs = process_sampler_cls()
    procs.start()
    try:
        with gpu_sampler(settings.device) as gpu:
            summary = run_segment(config, log=lines.append)
    finally:
        procs.stop()
    images = pads.dataset(str(out / "images"), format="parquet").to_table().to_pandas()
    actors = [pid for pid, titles in procs.titles.items()
              if pid not in earlier and any("MapWorker" in t for t in titles)]
    g = gpu.summary(idle)
    n = summary["images_this_run"]
    return {"nms": nms, "images": n, "wall_s": summary["wall_s"],
            "pipeline_s": summary["pipeline_s"], "images_per_s": summary["pipeline_images_per_s"],
            "actors": summary["actors"], "errors": int((images.status != "ok").sum()),
            "infer_ms": float(images.infer_ms.mean()), "postprocess_ms": float(images.postprocess_ms.mean()),
            "actor_peak_rss_mib": [round(procs.peak_rss[p] / 2**20) for p in actors], "gpu": g,
            # the steady rate: images over the GPU's active span (Ray Data's time includes the actors' start)
            "images_per_s_active": n / g["active_s"] if g.get("active_s") else None,
            "plan": next((line for line in lines if line.startswith("inference:")), "")}


def previous_actors() -> set[int]:
    """Pids of actor processes alive now (the last run's, still exiting): not this run's actors. Pids
    of idle workers are not excluded: Ray may turn a pre-started idle worker into an actor."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "MapWorker" in " ".join(p.cmdline()):
                pids.add(p.pid)
    return pids


def job_cases(settings: Settings, tmp: Path, actor_rows: list[dict[str, Any]], random_bare: float,
              report: Callable[[str], None]) -> list[dict[str, Any]]:
    """Random-init --backbone on synthetic photos, and the trained narrow model on synth scenes; each with
    box and mask NMS, as many images as the actor alone did in PIPELINE_BUDGET_S (1 to --num-images)."""
    import ray

    bench_pipeline = load_bench("pipeline")  # its ProcessSampler: peak RSS of every Ray process
    torch.manual_seed(0)
    random_ckpt = tmp / f"{settings.backbone}_random.pt"
    ifcn.save_checkpoint(ifcn.InstanceFCN(ifcn.ModelConfig(settings.backbone)), str(random_ckpt))
    h, w = settings.size
    photos = [bench_model.synthetic_scene(h, w, seed=i)[0] for i in range(min(DISTINCT_IMAGES, settings.num_images))]
    rng = np.random.default_rng(0)
    synth = [render_image(rng, SynthConfig(size=min(h, w)))[0]
             for _ in range(min(DISTINCT_IMAGES, settings.num_images))]
    # the trained model's own bare forward on its own images: end-to-end / bare compares like with like
    device, cfg = settings.device, settings.inference()
    trained = ifcn.load_checkpoint(str(TRAINED_CHECKPOINT)).to(device, memory_format=torch.channels_last).eval()
    trained_bare = bare_forward(trained, resized_batches(synth, cfg, settings.batch_size, device), len(synth),
                                settings.amp, device, forward_flops(trained, synth[0], cfg, device))
    del trained
    report(f"  bare forward of {TRAINED_CHECKPOINT.name} on {len(synth)} synth scenes of {min(h, w)} px: "
           f"{trained_bare['images_per_s']:.2f} images/s")
    rates = {(r["heads"], r["nms"]): r["images_per_s"] for r in actor_rows if r["postprocess_on"] in ("auto", "numpy")}
    cases = [("random", f"{settings.backbone} random init", random_ckpt, photos, random_bare),
             ("structured", f"{TRAINED_CHECKPOINT.name} (trained)", TRAINED_CHECKPOINT, synth,
              trained_bare["images_per_s"])]

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's progress lines drown the results
    t0 = time.perf_counter()
    ray.init(num_cpus=2 if settings.device == "cpu" else None, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    report(f"  ray.init: {time.perf_counter() - t0:.1f} s")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        for heads, label, ckpt, scenes, bare_rate in cases:
            for nms in ("box", "mask"):
                rate = rates.get((heads, nms), 1.0)
                count = min(settings.num_images, max(1, int(rate * PIPELINE_BUDGET_S[settings.device])))
                paths = write_jpegs(tmp / f"in_{heads}", scenes, count)[:count]
                r = job_run(paths, tmp / f"out_{heads}_{nms}", ckpt, settings, nms, bench_pipeline.ProcessSampler)
                r.update(heads=heads, model=label, bare_images_per_s=bare_rate,
                         ratio_to_bare=r["images_per_s"] / bare_rate)
                rows.append(r)
                g, active_rate = r["gpu"], r["images_per_s_active"] or 0.0
                gpu_text = (f"; GPU busy {g['util_mean']:.0f}% mean ({g['util_mean_active']:.0f}% over the "
                            f"{g['active_s']:.1f} s active span: {active_rate:.2f} images/s), "
                            f"{100 * g['busy_share']:.0f}% of samples >= {BUSY_PERCENT}%, peak {g['mem_peak_mib']:.0f} "
                            f"MiB above idle" if g.get("samples") else "")
                report(f"  {label:32s} {nms:4s}: {r['images_per_s']:8.2f} images/s ({r['images']} images, "
                       f"{r['pipeline_s']:.1f} s in Ray Data, {r['wall_s']:.1f} s wall, {r['actors']} actor(s))  "
                       f"end-to-end/bare {r['ratio_to_bare']:.3f}; per image in the actor: forward "
                       f"{r['infer_ms']:.0f} ms, postprocess+encode {r['postprocess_ms']:.0f} ms; actor peak RSS "
                       f"{r['actor_peak_rss_mib']} MiB{gpu_text}")
    finally:
        ray.shutdown()
    return rows


# --------------------------------------------------------------------------- 4. bounded memory

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
            reset_peak(device)
            rss = RssPeak()
            with rss:
                seconds, _ = bench_model.timed(lambda: predictor.proposals([scene]))
            r = {"heads": heads, "run": attempt + 1, "size": [h, w], "seconds": seconds, "peak_mib": peak_mib(device),
                 "rss_growth_mib": rss.growth_mib}
            rows.append(r)
            mem = (f"peak {r['peak_mib']:.0f} MiB GPU memory allocated" if r["peak_mib"] is not None
                   else f"process RSS +{r['rss_growth_mib']:.0f} MiB at peak")
            report(f"  {h}x{w} {heads:10s} run {attempt + 1}: {seconds:.2f} s, {mem}")
    return rows


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


# --------------------------------------------------------------------------- summary

def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (heads, nms): the ratios and the GPU's busy share and memory."""
    rows = []
    for heads in ("structured", "random"):
        for nms in ("box", "mask"):
            row: dict[str, Any] = {"heads": heads, "nms": nms}
            for a in results.get("actor", []):
                if (a["heads"], a["nms"]) == (heads, nms):
                    row[f"actor/bare ({a['postprocess_on']})"] = a["ratio_to_bare"]
                    row["actor peak MiB"] = a["peak_mib"] if a["peak_mib"] is not None else row.get("actor peak MiB")
                    if a["gpu"].get("samples"):
                        row["actor GPU busy %"] = a["gpu"]["util_mean"]
            for j in results.get("job", []):
                if (j["heads"], j["nms"]) == (heads, nms):
                    row["end-to-end/bare"] = j["ratio_to_bare"]
                    if j.get("images_per_s_active"):
                        row["e2e/bare (GPU-active span)"] = j["images_per_s_active"] / j["bare_images_per_s"]
                    if j["gpu"].get("samples"):
                        row["job GPU busy % (mean)"] = j["gpu"]["util_mean"]
                        row[f"job samples >= {BUSY_PERCENT}%"] = 100 * j["gpu"]["busy_share"]
                        row["job peak MiB"] = j["gpu"]["mem_peak_mib"]
                    else:
                        row["job actor RSS MiB"] = max(j["actor_peak_rss_mib"], default=None)
            rows.append(row)
    return rows


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


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=None, help="N (default 256 on GPU, 8 on CPU)")
    ap.add_argument("--size", default=None, help="image HxW (default 480x640 on GPU, 256x256 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help=f"images per forward / actor call "
                    f"(default: the job's, {GPU_BATCH} on GPU, {CPU_BATCH} on CPU)")
    ap.add_argument("--max-proposals", type=int, default=None, help="default 1000 on GPU (the paper's), 100 on CPU")
    ap.add_argument("--backbone", choices=ifcn.BACKBONES, default=None,
                    help="default vgg16 on GPU, vgg16_narrow on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile forward (~1 min of warm-up)")
    ap.add_argument("--skip-pipeline", action="store_true", help="skip part 4 (jobs.segment end to end on Ray)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after every part)")
    args = ap.parse_args(argv)
    settings = make_settings(args)
    device = settings.device
    results: dict[str, Any] = {"settings": asdict(settings)}

    def report(line: str) -> None:
        print(line, flush=True)

    def save() -> None:
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
           f"batch {settings.batch_size}, max {settings.max_proposals} proposals, amp "
           f"{str(settings.amp).replace('torch.', '')}, postprocess paths {list(settings.postprocess_on)}")

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
    save()

    report("3. actor alone (Predictor.windows + postprocess, as InferenceActor runs them)")
    nets = {"structured": BatchedOracle(bench_model.OracleHeads(model, instances)), "random": model}
    results["actor"] = actor_settings(settings, nets, images, fwd["images_per_s"], report)
    save()

    report(f"4. bounded memory: one {settings.big_size[0]}x{settings.big_size[1]} synthetic photo "
           f"(postprocess on the device)")
    results["big_image"] = big_image(model, settings, report)
    save()
    del batches
    if device == "cuda":
        torch.cuda.empty_cache()

    if settings.pipeline:
        report(f"5. jobs.segment end to end (pipeline.run.run_segment, local Ray"
               f"{', 2 CPUs' if device == 'cpu' else ''})")
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            results["job"] = job_cases(settings, Path(tmp), results["actor"], fwd["images_per_s"], report)
        save()

    if settings.compile:
        report("6. bare forward under torch.compile (as Predictor(compile=True) does it)")
        batches = resized_batches(images, settings.inference(), settings.batch_size, device)
        try:
            compiled = bare_forward(torch.compile(model), batches, len(images), settings.amp, device, flops)
            speedup = compiled["images_per_s"] / fwd["images_per_s"]
            report(f"  {compiled['images_per_s']:.2f} images/s, {compiled['tflops']:.2f} TFLOP/s "
                   f"({compiled['tflops'] / mm['tflops']:.3f} of matmul, {speedup:.2f}x uncompiled); "
                   f"compile warm-up {compiled['warmup_s']:.1f} s")
        except Exception as e:  # a compiler failure must not cost the rest of the run
            compiled = {"error": f"{type(e).__name__}: {e}"}
            report(f"  torch.compile failed: {compiled['error']}")
        results["forward_compiled"] = compiled
    else:
        report("6. torch.compile: skipped (" + ("--no-compile" if device == "cuda" else "CPU run") + ")")

    report("summary (ratios to the bare forward of the same model; structured end-to-end = the trained "
           f"{TRAINED_CHECKPOINT.name} on synth scenes)")
    results["summary"] = summary_rows(results)
    print_table(results["summary"], report)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
