"""Pipeline throughput vs the bare model, on the same images and the same cores; peak memory per actor.

    python bench/pipeline.py --num-images 200            # ~10 min on 2 idle cores
    python bench/pipeline.py --num-images 20 --cpus 2    # quick look

Measures, in one run:
  bare      `ifcn.Predictor.predict` in a loop over images already decoded in memory (the
            model alone: no I/O, no Ray), as 1 loop x 1 torch thread and as --cpus loops in
            parallel processes x 1 thread (the most a hand-written loop gets from the cores);
            the faster one is the baseline (--threaded-baseline adds 1 loop x --cpus threads);
  pipeline  the job (`pipeline.run.run_segment`) on a local Ray with --cpus CPUs, from PNG
            files on disk to committed Parquet, including Ray Data start-up and the actors'
            model load (ray.init itself is timed apart);
and prints images/s of both and their ratio (target >= 0.9), the CPU seconds each spent
(every process of the local Ray counted), the per-image stage times the job records in its
images table, the compact proposals' hand-off size, (de)serialisation and encoding time, and the peak RSS of
every actor and task process, sampled with psutil every 0.2 s.

Model: the narrow VGG-16 variant with RANDOM weights unless --checkpoint is given (e.g. the
synthetic-data model in checkpoints/narrow_synth.pt). The forward pass costs the same as
with trained weights; the CPU half (paste, mask NMS, RLE) depends on what the masks look
like, so trained weights can move the reducer's share. Images: synthetic 256 x 256 scenes
of touching blobs (ifcn.data.synth). Scales: 256 * 1.5^{-1, 0, 1} = (171, 256, 384), the
paper's geometric ladder around the image's own size; everything else is the paper's
default (1000 windows per scale, mask NMS at IoU 0.8, top 1000 proposals).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import ifcn  # noqa: E402
from ifcn.data.synth import SynthConfig, render_image  # noqa: E402
from ifcn.image import decode_image  # noqa: E402

SAMPLE_S = 0.2  # psutil sampling period: short enough to catch an actor's peak during a batch


def make_inputs(folder: Path, num_images: int, size: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        image, _ = render_image(rng, SynthConfig(size=size))
        path = folder / f"{i:06d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def cpu_seconds_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bare_worker(paths: list[Path], checkpoint: str, inference: dict[str, Any], threads: int, barrier, results) -> None:
    """One bare loop: Predictor.predict over pre-decoded images (runs in its own spawned process)."""
    torch.set_num_threads(threads)
    config = ifcn.InferenceConfig.from_dict(inference)
    images = [decode_image(p.read_bytes(), str(p)) for p in paths]
    predictor = ifcn.Predictor(ifcn.load_checkpoint(checkpoint), config, device="cpu")
    predictor.predict(images[0])  # warm-up: first-call allocations and oneDNN kernel selection
    barrier.wait()  # all loops start together, so their union measures the cores, not the start-up
    forward = post = 0.0
    cpu0, t0 = cpu_seconds_self(), time.time()
    for image in images:
        a = time.perf_counter()
        cands = predictor.candidates(image)
        b = time.perf_counter()
        ifcn.postprocess(cands, config)  # == predictor.predict(image), timed in its two halves
        post += time.perf_counter() - b
        forward += b - a
    results.put({"images": len(images), "start": t0, "end": time.time(), "cpu_s": cpu_seconds_self() - cpu0,
                 "candidates_s": forward, "postprocess_s": post})


def bench_bare(paths: list[Path], checkpoint: str, inference: ifcn.InferenceConfig, processes: int,
               threads: int) -> dict[str, Any]:
    """`processes` bare loops over disjoint slices of the images, `threads` torch threads each.

    1 x 1 is the literal loop; N x 1 is the most a hand-written multi-process loop gets out
    of N cores; 1 x N is the loop with torch's intra-op threads (poor on small images and
    badly hurt by other load on shared cores: every parallel region waits for its slowest thread).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork after torch started its thread pool
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(paths[i::processes], checkpoint, inference.to_dict(), threads,
                                                    barrier, results)) for i in range(processes)]
    for proc in procs:
        proc.start()
    parts = [results.get(timeout=7200) for _ in procs]
    for proc in procs:
        proc.join()
    n = sum(r["images"] for r in parts)
    wall = max(r["end"] for r in parts) - min(r["start"] for r in parts)
    return {"mode": f"{processes} process(es) x {threads} thread(s)", "images": n, "wall_s": wall,
            "images_per_s": n / wall, "cpu_s": sum(r["cpu_s"] for r in parts),
            "candidates_ms": 1e3 * sum(r["candidates_s"] for r in parts) / n,
            "postprocess_ms": 1e3 * sum(r["postprocess_s"] for r in parts) / n}


class ProcessSampler(threading.Thread):
    """Samples this process and all its descendants (the local Ray: GCS, raylet, workers).

    Keeps, per pid, the peak RSS, the latest CPU times and the process title Ray gives it
    (`ray::MapWorker(MapBatches(InferenceActor))`, `ray::IDLE`, ...; titles seen are all kept).
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.me = psutil.Process()
        self.stop_event = threading.Event()
        self.peak_rss: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.titles: dict[int, set[str]] = {}

    def sample(self) -> None:
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                    title = " ".join(p.cmdline())[:120] or p.name()
            except psutil.Error:
                continue
            self.peak_rss[p.pid] = max(self.peak_rss.get(p.pid, 0), rss)
            self.cpu[p.pid] = t.user + t.system
            self.titles.setdefault(p.pid, set()).add(title)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(SAMPLE_S)

    def stop(self) -> None:
        self.sample()  # final CPU times before Ray shuts down
        self.stop_event.set()
        self.join()

    def role(self, pid: int) -> str:
        """A readable role; Ray reuses task workers, so one process may have run both task kinds."""
        titles = " | ".join(sorted(self.titles.get(pid, ())))
        if pid == self.me.pid:
            return "driver (bench + run_segment)"
        if "InferenceActor" in titles:
            return "inference actor"
        tasks = [name for key, name in (("read_images", "read"), ("encode_and_stage", "encode")) if key in titles]
        if tasks:
            return f"task worker ({'+'.join(tasks)})"
        for key in ("gcs_server", "raylet"):
            if key in titles:
                return key
        return "idle ray worker" if "ray::" in titles or "default_worker" in titles else "ray system process"


def bench_pipeline(folder: Path, out: Path, checkpoint: str, inference: ifcn.InferenceConfig, cpus: int,
                   actors: int | None, batch_size: int, shard_size: int) -> dict[str, Any]:
    import ray

    from pipeline.config import SegmentConfig
    from pipeline.run import run_segment

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's progress lines drown the results
    sampler = ProcessSampler()
    cpu_before = {p.pid: sum(p.cpu_times()[:2]) for p in [sampler.me]}
    ray_start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_start = time.perf_counter() - ray_start
    sampler.start()
    try:
        config = SegmentConfig(input=str(folder), output=str(out), checkpoint=checkpoint, inference=inference,
                               shard_size=shard_size, actors=actors, batch_size=batch_size)
        t0 = time.perf_counter()
        summary = run_segment(config, log=lambda msg: None)
        wall = time.perf_counter() - t0
    finally:
        sampler.stop()
        ray.shutdown()
    from pipeline import read_output

    images = read_output(str(out), "images").to_pandas()  # the segments table's images view
    assert (images.status == "ok").all(), images[images.status != "ok"].error.tolist()[:3]
    cpu = {pid: t - cpu_before.get(pid, 0.0) for pid, t in sampler.cpu.items()}
    by_role: dict[str, list[int]] = {}
    for pid in sampler.peak_rss:
        by_role.setdefault(sampler.role(pid), []).append(pid)
    memory = {role: sorted((sampler.peak_rss[p] for p in pids), reverse=True) for role, pids in by_role.items()}
    cpu_by_role = {role: sum(cpu.get(p, 0.0) for p in pids) for role, pids in by_role.items()}
    n = summary["images_this_run"]
    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "ray_init_s": ray_start,
            "actors": summary["actors"], "batch_size": batch_size, "cpu_s": sum(cpu.values()),
            "cpu_s_by_role": cpu_by_role, "peak_rss_mb_by_role": {r: [round(v / 2**20) for v in vals]
                                                                  for r, vals in memory.items()},
            "stage_ms_mean": {c: float(images[c].mean()) for c in ("read_ms", "decode_ms", "infer_ms",
                                                                    "postprocess_ms")},
            "proposals": int(images.num_proposals.sum())}


def handoff_cost(paths: list[Path], checkpoint: str, inference: ifcn.InferenceConfig) -> dict[str, float]:
    """Size and (de)serialisation time of one image's compact proposals between actor and encoding
    task, and the encoding (COCO RLE strings) itself."""
    import pyarrow as pa

    from pipeline.stages.handoff import encode_column, proposals_column

    predictor = ifcn.Predictor(ifcn.load_checkpoint(checkpoint), inference, device="cpu")
    sizes, pack, unpack, encode = [], 0.0, 0.0, 0.0
    for p in paths:
        image = decode_image(p.read_bytes(), str(p))
        proposals = predictor.proposals([image])[0]
        t0 = time.perf_counter()
        column = proposals_column([proposals])  # what the actor hands on: Arrow columns (no unpacking)
        t1 = time.perf_counter()
        encode_column(column, [image.shape[0]], [image.shape[1]])
        t2 = time.perf_counter()
        encode += t2 - t1
        pack += t1 - t0
        sizes.append(pa.table({"proposals": column}).nbytes)
    n = len(paths)
    return {"proposals_mb": float(np.mean(sizes)) / 2**20, "pack_ms": 1e3 * pack / n, "unpack_ms": 1e3 * unpack / n,
            "encode_ms": 1e3 * max(0.0, encode - unpack) / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--nms", choices=("box", "mask"), default="box", help="NMS IoU of boxes (the paper's) or masks")
    p.add_argument("--size", type=int, default=256, help="synthetic image side in pixels")
    p.add_argument("--scales", default="171,256,384", help="inference short sides")
    p.add_argument("--cpus", type=int, default=2, help="cores for both: torch threads (bare) and Ray CPUs (pipeline)")
    p.add_argument("--actors", type=int, default=None, help="inference actors (default: the job's own choice)")
    p.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None,
                   help="model to run (e.g. checkpoints/narrow_synth.pt); default: vgg16_narrow with random init")
    p.add_argument("--threaded-baseline", action="store_true",
                   help="also time 1 bare loop with --cpus torch threads (slow on loaded machines)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus))

    inference = ifcn.InferenceConfig(scales=tuple(int(s) for s in args.scales.split(",")), nms=args.nms)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        paths = make_inputs(tmp / "images", args.num_images, args.size, args.seed)
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(args.seed)
            checkpoint = str(tmp / "narrow_random.pt")
            ifcn.save_checkpoint(ifcn.InstanceFCN(ifcn.ModelConfig(backbone="vgg16_narrow")), checkpoint)
        print(f"checkpoint: {args.checkpoint or 'vgg16_narrow, random init'}; scales {inference.scales}; "
              f"{args.num_images} synthetic {args.size} px images", flush=True)

        modes = [(1, 1), (args.cpus, 1)] + ([(1, args.cpus)] if args.threaded_baseline else [])
        bares = []
        for processes, threads in dict.fromkeys(modes):
            bare = bench_bare(paths, checkpoint, inference, processes, threads)
            bares.append(bare)
            print(f"bare Predictor.predict, {bare['mode']}: {bare['images_per_s']:.3f} images/s ({bare['images']} "
                  f"images, {bare['wall_s']:.1f} s; candidates {bare['candidates_ms']:.0f} ms + postprocess "
                  f"{bare['postprocess_ms']:.0f} ms per image; {bare['cpu_s']:.1f} CPU s)", flush=True)
        bare = max(bares, key=lambda r: r["images_per_s"])  # the strictest baseline
        pipe = bench_pipeline(tmp / "images", tmp / "out", checkpoint, inference, args.cpus, args.actors,
                              args.batch_size, args.shard_size)
        print(f"pipeline (run_segment, local Ray, {args.cpus} CPUs, {pipe['actors']} actor(s), batch "
              f"{pipe['batch_size']}): {pipe['images_per_s']:.3f} images/s ({pipe['images']} images, "
              f"{pipe['wall_s']:.1f} s end to end, + {pipe['ray_init_s']:.1f} s ray.init; "
              f"{pipe['cpu_s']:.1f} CPU s in all processes)", flush=True)
        handoff = handoff_cost(paths[:5], checkpoint, inference)
    load1 = os.getloadavg()

    ratio = pipe["images_per_s"] / bare["images_per_s"]
    cpu_ratio = (pipe["images"] / pipe["cpu_s"]) / (bare["images"] / bare["cpu_s"])
    print(f"ratio pipeline / best bare ({bare['mode']}) images/s: {ratio:.3f} (target >= 0.9)")
    print(f"ratio of images per CPU-second (pipeline / bare): {cpu_ratio:.3f} "
          f"(moves much less with other load on the machine)")
    print("pipeline stage means per image (from its images table): "
          + ", ".join(f"{k} {v:.1f}" for k, v in pipe["stage_ms_mean"].items()))
    print(f"proposals hand-off actor -> encoding task: {handoff['proposals_mb']:.2f} MB/image, "
          f"pack {handoff['pack_ms']:.1f} ms, unpack {handoff['unpack_ms']:.1f} ms, "
          f"COCO RLE strings {handoff['encode_ms']:.1f} ms")
    print("CPU seconds by process role: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(pipe["cpu_s_by_role"].items())))
    print("peak RSS (MB) by process role: "
          + "; ".join(f"{k} {v}" for k, v in sorted(pipe["peak_rss_mb_by_role"].items())))
    print(f"load average (1 min) before/after: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "bare": bares, "pipeline": pipe,
                                         "handoff": handoff, "ratio": ratio, "cpu_ratio": cpu_ratio,
                                         "loadavg": [load0, load1]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
