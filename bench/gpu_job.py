"""bench/gpu.py's part 6: the segmentation job end to end (pipeline.run.run_segment on a local Ray) on
generated JPEGs, box and mask NMS, with enough images for JOB_STEADY_S at the actor's rate: start-up
(the call to the first batch out of an actor) apart from the steady state after each actor's
WARM_BATCHES batches, whose rate and device busy share come from the actors' per-batch CUDA-event
lines (pipeline.stages.infer.STATS_DIR_ENV), with nvidia-smi sampled over the same window.
Needs ray, and deltalake where pipeline.run needs it.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import ifcn
from pipeline.stages.infer import STATS_DIR_ENV

# bench/gpu.py loads this module by file path (bench/ must not go on sys.path: bench/pipeline.py would
# shadow the `pipeline` package), after the bench modules it uses, with the repository on sys.path.
bench_model, samplers = sys.modules["bench_model"], sys.modules["bench_gpu_samplers"]
Settings = sys.modules["bench_gpu_timing"].Settings

JOB_STEADY_S = {"cuda": 30.0, "cpu": 10.0}  # the job's steady window, at the actor's rate
WARM_BATCHES = 2  # each actor's first batches (cuDNN's choice per shape, first reads): start-up, not steady
CPU_RAY_CPUS = 2  # the CPU run's local Ray
JOB_STARTUP_S = 40.0  # allowance per job run for Ray Data's start and the actors' (for the time budget)
DISTINCT_IMAGES = 16  # generated scenes; more files repeat them (content beyond 16 scenes changes nothing)


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
