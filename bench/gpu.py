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
                (ifcn.tools.opcount; the paper's defaults, 480x640, vgg16_narrow, structured (bench/model.py's
                OracleHeads) and random heads; box NMS at batch 16 and 2, mask at batch 4). The same on any
                machine of the same amp (bf16 autocast on CUDA adds its casts);
  4. actor      the real pipeline.stages.infer.InferenceActor called with read-stage batches from CONCURRENT_CALLS
                threads, as Ray Data calls a GPU actor; its first call apart, then ACTOR_BUDGET_S of steady
                calls: images/s, actor / bare forward, device busy by the actor's CUDA events (device time over
                wall time) beside nvidia-smi's utilisation, and the overlap share of the concurrent calls: of
                their host work on the calling threads, the share run while another call's device half ran on
                the device thread (ifcn.batch.hostwork; on CPU a CPU figure: the device half is CPU work there);
  5. big image  one 4000x3000 photo through `Predictor.proposals` at the defaults: peak memory and time;
  6. job        `pipeline.run.run_segment` on generated JPEGs (random-init --backbone), box and mask NMS, images
                for JOB_STEADY_S at the actor's rate: start-up (call to the first batch out of an actor) apart
                from the steady state after each actor's WARM_BATCHES batches, whose rate and device busy
                share come from the actors' per-batch CUDA-event lines (pipeline.stages.infer.STATS_DIR_ENV), with
                nvidia-smi sampled over the same window;
then a table per (heads, nms), and with --out the JSON after each part. On CUDA it keeps to TIME_BUDGET_S
(a job case that would not fit is skipped, saying so). Without CUDA it says so on its first line and runs
CPU equivalents at a small size (narrow backbone, 256x256, 3 scales, 100 proposals, a local Ray with 2
CPUs): they prove the script runs, they are not GPU figures (the op counts are the same).
Needs ray for part 6 only, and deltalake only where pipeline.run needs it.

This file is the command line and the report (settings, the summary table, the JSON); the parts
live beside it, loaded by file path: bench/gpu_timing.py (parts 1 to 5 and Settings),
bench/gpu_job.py (part 6) and bench/gpu_samplers.py (what they sample: nvidia-smi, peak memory,
the actors' per-batch lines; the inputs they feed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on sys.path, where bench/pipeline.py shadows the `pipeline` package
# (here, and in Ray's workers, which get the driver's script directory when it is on sys.path): take it off.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import ifcn  # noqa: E402
from pipeline.stages.infer import CONCURRENT_CALLS  # noqa: E402

NO_CUDA_LINE = "no CUDA device: CPU equivalents at a small size; these are not GPU figures"
TIME_BUDGET_S = 285.0  # the whole CUDA run, so that a rerun fits a 15-minute lease
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
timing = load_bench("gpu_timing")  # parts 1-5 and Settings
job = load_bench("gpu_job")  # part 6
Settings = timing.Settings


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def job_batch(device: str) -> int:
    """The job's own batch size (pipeline.run), or FALLBACK_BATCH where pipeline.run's imports are missing."""
    try:
        from pipeline.graph import CPU_BATCH, GPU_BATCH
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
    mm = results["matmul"] = timing.matmul_peak(device)
    unit, scale = ("TFLOP/s", 1.0) if device == "cuda" else ("GFLOP/s", 1e3)
    report(f"  {mm['dtype']} {mm['reps']} x {mm['n']}^2: {mm['tflops'] * scale:.1f} {unit}")
    save()

    report("2. bare forward")
    torch.manual_seed(0)
    model = ifcn.InstanceFCN(ifcn.ModelConfig(settings.backbone)).to(device, memory_format=torch.channels_last).eval()
    scene, instances = bench_model.synthetic_scene(h, w)
    images = [scene] * settings.num_images  # one scene: OracleHeads' maps are made for it
    flops = timing.forward_flops(model, scene, settings.inference(), device)
    batches = timing.resized_batches(images, settings.inference(), settings.batch_size, device)
    fwd = results["forward"] = timing.bare_forward(model, batches, len(images), settings.amp, device, flops)
    fwd["gflop_per_image"] = flops / 1e9
    report(f"  {flops / 1e9:.1f} GFLOP per image; {fwd['images_per_s']:.2f} images/s, {fwd['tflops'] * scale:.2f} "
           f"{unit} ({fwd['tflops'] / mm['tflops']:.3f} of matmul); warm-up pass {fwd['warmup_s']:.1f} s")
    del batches
    save()

    if settings.counts:
        report(f"3. op counts of the actor's device path (forward included; paper's defaults, {timing.COUNT_SIZE[0]}x"
               f"{timing.COUNT_SIZE[1]}, vgg16_narrow, amp {str(settings.amp).replace('torch.', '')})")
        results["counts"] = timing.op_counts(settings, report)
        save()
    else:
        report("3. op counts: skipped (--skip-counts)")

    report(f"4. the actor alone (pipeline.stages.infer.InferenceActor, {CONCURRENT_CALLS} calls at once)")
    nets = {"structured": timing.BatchedOracle(bench_model.OracleHeads(model, instances)), "random": model}
    results["actor"] = timing.actor_settings(settings, nets, images, fwd["images_per_s"], report)
    save()

    if settings.big:
        report(f"5. bounded memory: one {settings.big_size[0]}x{settings.big_size[1]} synthetic photo "
               f"(postprocess on the device)")
        results["big_image"] = timing.big_image(model, settings, report)
        save()
    else:
        report("5. bounded memory: skipped (--skip-big-image)")
    if device == "cuda":
        torch.cuda.empty_cache()

    if settings.pipeline:
        report(f"6. jobs.segment end to end (pipeline.run.run_segment, local Ray"
               f"{', 2 CPUs' if device == 'cpu' else ''}; {settings.backbone} random init)")
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            results["job"] = job.job_cases(settings, Path(tmp), results["actor"], fwd["images_per_s"], deadline, report)
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
