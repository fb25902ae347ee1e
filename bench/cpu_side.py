"""The job's CPU side per image, all processes counted, against the same job written the plain Ray Data way.

    python -m bench.cpu_side                     # 200 images per format and size step, 1 round (~5 min on 2 cores)
    python -m bench.cpu_side --images 60 --rounds 1 --formats png64

A GPU node's CPUs must read, decode, hand off, encode and publish as fast as its GPU infers. This
measures that CPU work with the model taken out: a near-free stub predictor (fixed proposals per
image shape, generated once per actor: 10 at 64x64, 1000 realistic masks at 480x640) enters the
project's job through `SegmentConfig.predictor_factory` (the supported seam: the planner still
fingerprints --checkpoint, the actor builds the stub instead of the model). Two jobs, same images:

  project   pipeline.run.run_segment in the GPU-node layout (`--postprocess tasks --actors 1`):
            read tasks -> actor -> encoding tasks -> publish tasks -> Delta commits
  plain     the Ray Data way: read_images -> map_batches(actor, same stub) ->
            map_batches(pycocotools encode, one frPyObjects call per image) -> write_parquet

Each run is a fresh process that starts its own local Ray (`ray.init(num_cpus=--cpus, num_gpus=1)`: a logical GPU, no device) and makes
itself a child subreaper, so every process the run starts (raylet, GCS, dashboard, workers,
orphaned workers too) is reaped inside its tree, and the bench reads the run's CPU time (user +
system) from its rusage when it exits. That came out below the tree sampled with psutil every
0.05 s, so the total is the larger of the two (the sampled sum misses each process's last 0.05 s).
The stage split is that sampling (each process's CPU growth charged to its current title: read, actor, encode, publish,
idle workers, raylet/GCS, other Ray processes, driver; what ended between samples is "unsampled").
Runs are interleaved (project, plain, project, plain ...) at --images/2 and --images per format:
core-ms per image is the larger run's total / images; marginal = the extra CPU of the larger run per
extra image (start-up cost cancels). The driver's share of a core per 100 images/s is printed two
ways: its marginal x 10, and "while streaming" (its CPU, every thread, while Ray Data's executor ran,
at the steady throughput: `streaming_share`), which carries no start-up noise. The last line is one JSON object:
{"jpeg480": {"project": MS, "plain": MS}, "png64": {...}} (median core-ms per image, all processes).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "narrow_synth.pt"  # planned and fingerprinted, never loaded (the stub runs)
FORMATS = {"jpeg480": ((480, 640), ".jpg", 1000), "png64": ((64, 64), ".png", 10)}  # size, file type, proposals
SAMPLE_S = 0.05
PR_SET_CHILD_SUBREAPER = 36
REAP_WAIT_S = 30.0


# --------------------------------------------------------------------------- the stub model

_CACHE: dict[tuple[int, int], Any] = {}


def stub_predictor(config: Any, device: Any) -> "StubPredictor":
    """SegmentConfig.predictor_factory target: `bench.cpu_side:stub_predictor`."""
    return StubPredictor(device)


class StubPredictor:
    """What InferenceActor calls on a Predictor (`windows`, `postprocess_batch`, `device`), at no cost:
    every image of a shape gets the same proposals, made once per process."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def windows(self, images: list[np.ndarray], stacks: Any = None) -> list[tuple[int, int]]:
        return [image.shape[:2] for image in images]

    def postprocess_batch(self, windows: list[tuple[int, int]], sizes: list[tuple[int, int]]) -> list[Any]:
        return [stub_proposals(tuple(s)) for s in sizes]


def stub_proposals(size: tuple[int, int]) -> Any:
    """Fixed proposals for an image size: ellipses of many sizes anywhere in the image (1000 at
    480x640 and larger, 10 at small sizes), best first, as ifcn.Proposals."""
    if size in _CACHE:
        return _CACHE[size]
    from ifcn.batch.containers import Proposals
    from ifcn.ops.runs import crop_runs

    h, w = size
    count = 1000 if h * w >= 480 * 640 else 10
    rng = np.random.default_rng(h * 100_003 + w)
    rows = []
    for _ in range(count):
        bh, bw = (int(rng.integers(max(2, s // 40), max(3, s // 2))) for s in (h, w))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        yy, xx = np.mgrid[0:bh, 0:bw]
        crop = ((yy + 0.5 - bh / 2) / (bh / 2)) ** 2 + ((xx + 0.5 - bw / 2) / (bw / 2)) ** 2 <= 1.0
        ys, xs = np.nonzero(crop)
        crop = crop[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        top, left = top + int(ys.min()), left + int(xs.min())
        rows.append((crop_runs(top, left, crop, size), (left, top, crop.shape[1], crop.shape[0]), int(crop.sum())))
    runs = [r for r, _, _ in rows]
    scores = np.sort(rng.random(count).astype(np.float32))[::-1].copy()
    _CACHE[size] = Proposals(size, scores, np.array([b for _, b, _ in rows], np.float32),
                             np.array([a for _, _, a in rows], np.int64), np.full(count, min(size), np.int32),
                             np.concatenate(runs).astype(np.uint32), np.array([len(r) for r in runs], np.int32))
    return _CACHE[size]


# --------------------------------------------------------------------------- inputs

def make_images(folder: Path, fmt: str, n: int, seed: int = 0) -> None:
    """n synthetic scenes (smooth gradients, flat shapes, mild noise: JPEG sizes like photos' at q90)."""
    from PIL import Image, ImageDraw

    (h, w), ext, _ = FORMATS[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = np.stack([(xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], -1)
        image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            draw.ellipse([x0, y0, x0 + rng.integers(4, w // 2), y0 + rng.integers(4, h // 2)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(folder / f"{i:06d}{ext}", quality=90)


# --------------------------------------------------------------------------- one run (a child process)

def _become_subreaper() -> None:
    """Orphaned descendants (workers whose raylet went first) are reparented to this process and reaped here,
    so their CPU time reaches this process's rusage and the bench's."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed: the CPU totals would miss orphans")


def _reap_all() -> None:
    """Waits for every descendant (Ray's processes exit after shutdown), then kills what is left."""
    import psutil

    deadline = time.time() + REAP_WAIT_S
    me = psutil.Process()
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        if time.time() > deadline:
            for child in me.children(recursive=True):
                child.kill()
            deadline = float("inf")
        time.sleep(0.1)


def run_project(images: Path, out: Path) -> dict[str, Any]:
    from pipeline.config import SegmentConfig
    from pipeline.run import run_segment

    summary = run_segment(SegmentConfig(input=str(images), output=str(out), checkpoint=str(CHECKPOINT),
                                        postprocess="tasks", actors=1,
                                        predictor_factory="bench.cpu_side:stub_predictor"),
                          log=lambda msg: None)
    return {"images": summary["images"], "images_ok": summary["images_ok"]}


class PlainActor:
    """The plain twin's actor: the same stub, proposals handed on as per-image numpy arrays."""

    def __init__(self) -> None:
        self.predictor = StubPredictor("cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = list(batch["image"])
        sizes = [im.shape[:2] for im in images]
        props = self.predictor.postprocess_batch(self.predictor.windows(images), sizes)
        return {"path": batch["path"], "height": np.array([s[0] for s in sizes]), "width": np.array([s[1] for s in sizes]),
                "scores": [p.scores for p in props], "boxes": [p.boxes for p in props],
                "areas": [p.areas for p in props], "counts": [p.counts for p in props],
                "lengths": [p.lengths for p in props]}


def plain_encode(batch: dict[str, np.ndarray]) -> Any:
    """The plain twin's encoding: pycocotools on each image's masks (one call per image), rows as dicts."""
    import pyarrow as pa
    from pycocotools import mask as mask_utils

    rows = []
    for path, h, w, scores, boxes, areas, counts, lengths in zip(
            batch["path"], batch["height"], batch["width"], batch["scores"], batch["boxes"], batch["areas"],
            batch["counts"], batch["lengths"]):
        h, w = int(h), int(w)
        runs = np.split(np.asarray(counts, np.uint32), np.cumsum(lengths)[:-1])
        rles = mask_utils.frPyObjects([{"counts": r, "size": [h, w]} for r in runs], h, w)
        rows.append({"path": path, "height": h, "width": w, "proposals": [
            {"rank": i, "score": float(s), "bbox": [float(v) for v in b], "area": int(a),
             "rle": r["counts"].decode("ascii")} for i, (s, b, a, r) in enumerate(zip(scores, boxes, areas, rles))]})
    return pa.Table.from_pylist(rows)


def run_plain(images: Path, out: Path) -> dict[str, Any]:
    import ray.data

    ds = ray.data.read_images(str(images), include_paths=True, mode="RGB")
    ds = ds.map_batches(PlainActor, batch_size=16, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
                        num_gpus=1)
    ds = ds.map_batches(plain_encode, batch_size=16, batch_format="numpy")
    ds.write_parquet(str(out))
    import pyarrow.parquet as pq

    n = sum(pq.read_metadata(f).num_rows for f in out.glob("*.parquet"))
    return {"images": n, "images_ok": n}


# The driver's threads by role (thread names: Ray Data names its executor thread "StreamingExecutor-<dataset>"
# and its iter_batches consumer "iter_threaded"; threads Python does not know are Ray core's C++ threads).
DRIVER_ROLES = (("StreamingExecutor", "executor loop"), ("iter_threaded", "batch consumer"), ("MainThread", "main"))
THREAD_SAMPLE_S = 0.5
SAMPLER_THREAD = "bench-driver-threads"


class DriverThreads:
    """The driver's CPU by thread role, from /proc/self/task (a thread's time vanishes from the process's
    per-thread view when it exits, so each is sampled while alive), and how long the executor loop ran:
    Ray Data's executor wakes ~10 times a second (`ray.wait(..., timeout=0.1)`) whatever the throughput,
    so its CPU follows that time, not the images."""

    def __init__(self) -> None:
        self.cpu: dict[int, tuple[str, float]] = {}
        self.executor_seen: list[float] = []  # first and last time an executor thread was seen
        self.streaming_cpu: list[float] = []  # the driver's CPU (every thread) at those two times
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self.sample()
        self.start = dict(self.cpu)
        self.thread = threading.Thread(target=self._loop, daemon=True, name=SAMPLER_THREAD)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(THREAD_SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        executor_running = False
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # ended since the listing
                continue
            name = names.get(int(tid))
            if name == SAMPLER_THREAD:  # the bench's own cost
                continue
            role = next((r for key, r in DRIVER_ROLES if name and name.startswith(key)),
                        "ray core (C++)" if name is None else "other python")
            if name is None and int(tid) in self.cpu:  # a Python thread ending (or just starting) keeps its role
                role = self.cpu[int(tid)][0]
            self.cpu[int(tid)] = (role, (int(fields[11]) + int(fields[12])) / self.tick)  # utime + stime
            if role == "executor loop":
                now = time.perf_counter()
                self.executor_seen = [self.executor_seen[0] if self.executor_seen else now, now]
                executor_running = True
        if executor_running:
            total = sum(cpu for _, cpu in self.cpu.values())
            self.streaming_cpu = [self.streaming_cpu[0] if self.streaming_cpu else total, total]

    def stop(self) -> dict[str, float]:
        """CPU seconds by role since the start, the executor loop's run time ("executor s") and the driver's
        CPU, every thread, while it ran ("streaming cpu s")."""
        self._stop.set()
        self.thread.join()
        self.sample()
        by_role: dict[str, float] = {}
        for tid, (role, cpu) in self.cpu.items():
            by_role[role] = by_role.get(role, 0.0) + cpu - self.start.get(tid, (role, 0.0))[1]
        by_role["executor s"] = self.executor_seen[1] - self.executor_seen[0] if self.executor_seen else 0.0
        by_role["streaming cpu s"] = self.streaming_cpu[1] - self.streaming_cpu[0] if self.streaming_cpu else 0.0
        return by_role


def child(job: str, images: Path, out: Path, cpus: int) -> None:
    _become_subreaper()
    import ray

    # One logical GPU (no device behind it: torch finds no CUDA and the actors run on the CPU) so that the
    # project resolves its GPU-node layout by itself: a 1-GPU actor that no read task fuses into, encoding
    # tasks behind it; the plain twin's actor asks for it too.
    if job == "project":  # the settings run_segment gives a local Ray it starts itself (pipeline/ray_init.py)
        from pipeline.ray_init import LOCAL_ENV

        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    ray.init(num_cpus=cpus, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t0 = time.perf_counter()
    threads = DriverThreads()
    result = (run_project if job == "project" else run_plain)(images, out)
    wall = time.perf_counter() - t0
    driver_threads = threads.stop()
    ray.shutdown()
    _reap_all()
    self_cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    print(json.dumps({**result, "wall_s": wall, "driver_cpu_s": self_cpu, "driver_torch": "torch" in sys.modules,
                      "driver_threads": driver_threads}),
          flush=True)


# --------------------------------------------------------------------------- the bench (parent)

def role(title: str, is_driver: bool) -> str:
    if is_driver:
        return "driver"
    t = title.lower()
    for key, name in (("gcs_server", "raylet+gcs"), ("raylet", "raylet+gcs"), ("default_worker.py", "starting workers"),
                      ("idle", "idle workers"),
                      ("mapworker", "actor"), ("encode", "encode"), ("publish", "publish"), ("rewrite", "publish"),
                      ("write", "publish"), ("read", "read")):
        if key in t:
            return name
    return "other ray" if "ray" in t else "other"


class TreeSampler:
    """Samples a process tree's CPU times, charging each process's growth to its current role."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.last: dict[int, float] = {}
        self.by_role: dict[str, float] = {}
        self.pids: set[int] = set()
        self.workers: set[int] = set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(SAMPLE_S)

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    title = " ".join(p.cmdline()) or p.name()
            except psutil.Error:
                continue
            total = t.user + t.system
            name = role(title, p.pid == self.root.pid)
            self.by_role[name] = self.by_role.get(name, 0.0) + total - self.last.get(p.pid, 0.0)
            self.last[p.pid] = total
            self.pids.add(p.pid)
            if title.startswith("ray::") or "default_worker.py" in title:
                self.workers.add(p.pid)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def measure(job: str, images: Path, cpus: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cpu_side_out_") as out:
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "bench.cpu_side", "--child", job, "--input", str(images),
                                 "--output", str(Path(out) / "o"), "--cpus", str(cpus)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = TreeSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop()
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} run failed ({proc.returncode}): {stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    expected = len(list(images.iterdir()))
    if result["images_ok"] != expected:  # a run that failed its images is fast and meaningless: refuse it
        raise RuntimeError(f"{job} run over {images}: {result['images_ok']} of {expected} images came out ok "
                           f"({result['images']} rows); the figures would not measure the job. stderr: {stderr[-2000:]}")
    # The run's process and every descendant it reaped. On the project's 2-core VM this came out below the
    # sampled sum (Ray's processes end in ways that keep part of their time out of it), so the total is the
    # larger of the two; the sampled sum misses only each process's last < SAMPLE_S.
    reaped = usage.ru_utime + usage.ru_stime
    split = dict(sampler.by_role)
    total = max(reaped, sum(split.values()))
    split["not sampled"] = total - sum(split.values())
    return {"cpu_s": total, "reaped_cpu_s": reaped, "wall_s": result["wall_s"], "split": split, "processes": len(sampler.pids),
            "workers": len(sampler.workers), "driver_threads": result["driver_threads"]}


def print_driver_threads(runs: dict[tuple[str, int], list[dict[str, Any]]], sizes: tuple[int, int]) -> None:
    """The driver by thread role: % of a core per 100 images/s (marginal x 10, as the driver line); for the
    executor loop also its % of a core while it ran (larger run): a per-second cost, a steady share of a
    core whose per-image figure falls as throughput rises (medians over rounds)."""
    roles = sorted({k for job in ("project", "plain") for m in runs[(job, sizes[1])] for k in m["driver_threads"]}
                   - {"executor s", "streaming cpu s"})
    for name in roles:
        marg, rate = [], []
        for job in ("project", "plain"):
            big, small = runs[(job, sizes[1])], runs[(job, sizes[0])]
            marg.append(statistics.median(10e3 * (a["driver_threads"].get(name, 0.0) - b["driver_threads"].get(name, 0.0))
                                          / (sizes[1] - sizes[0]) for a, b in zip(big, small)))
            rate.append(statistics.median(100 * m["driver_threads"].get(name, 0.0)
                                          / max(m["driver_threads"]["executor s"], 1e-9) for m in big))
        note = f"    ({rate[0]:.1f}% vs {rate[1]:.1f}% of a core while it ran)" if name == "executor loop" else ""
        print(f"    {name:20s}{marg[0]:10.1f}{marg[1]:10.1f}{note}")


def streaming_share(runs: dict[tuple[str, int], list[dict[str, Any]]], job: str,
                    sizes: tuple[int, int]) -> tuple[float, float, float]:
    """The driver's steady cost without start-up noise: its CPU, every thread, while the executor ran (the
    larger run), as % of a core, at the steady throughput (extra images over extra wall time, larger run
    over smaller), and the two as % of a core per 100 images/s (medians over rounds). The marginal line
    above carries each run's start-up (imports, planning: +-0.3 CPU-s) into a per-image figure."""
    big, small = runs[(job, sizes[1])], runs[(job, sizes[0])]
    share = statistics.median(100 * m["driver_threads"].get("streaming cpu s", 0.0)
                              / max(m["driver_threads"]["executor s"], 1e-9) for m in big)
    rate = statistics.median((sizes[1] - sizes[0]) / max(a["wall_s"] - b["wall_s"], 1e-9) for a, b in zip(big, small))
    return share, rate, 100 * share / rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="images of the larger run (the smaller has half)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cpus", type=int, default=2, help="the local Ray's logical CPUs")
    p.add_argument("--formats", default="jpeg480,png64")
    p.add_argument("--images-dir", help="keep the generated images here and reuse them (default: a temporary folder)")
    p.add_argument("--child", choices=("project", "plain"), help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, Path(args.input), Path(args.output), args.cpus)
        return 0
    sizes = (args.images // 2, args.images)
    headline: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cpu_side_in_") as tmp:
        for fmt in args.formats.split(","):
            folders = {}
            for n in sizes:
                folders[n] = Path(args.images_dir or tmp) / f"{fmt}-{n}"
                if not (folders[n].is_dir() and len(list(folders[n].iterdir())) == n):
                    make_images(folders[n], fmt, n)
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for r in range(args.rounds):
                for n in sizes:
                    for job in ("project", "plain"):
                        m = measure(job, folders[n], args.cpus)
                        runs.setdefault((job, n), []).append(m)
                        print(f"{fmt} round {r} {job:7s} {n:5d} images: {m['cpu_s']:7.2f} CPU-s, {m['wall_s']:6.1f} s "
                              f"wall, {1e3 * m['cpu_s'] / n:6.1f} core-ms/image, {m['processes']} processes "
                              f"({m['workers']} Ray workers)", flush=True)
            print(f"\n{fmt}: {FORMATS[fmt][2]} proposals per image, {sizes[1]} images (marginal over {sizes[0]} more)")
            print(f"{'':24s}{'project':>10s}{'plain':>10s}{'ratio':>8s}")
            per = {job: statistics.median(1e3 * m["cpu_s"] / sizes[1] for m in runs[(job, sizes[1])])
                   for job in ("project", "plain")}
            marg = {job: statistics.median(1e3 * (a["cpu_s"] - b["cpu_s"]) / (sizes[1] - sizes[0])
                                           for a, b in zip(runs[(job, sizes[1])], runs[(job, sizes[0])]))
                    for job in ("project", "plain")}
            print(f"{'core-ms/image, total':24s}{per['project']:10.1f}{per['plain']:10.1f}"
                  f"{per['project'] / per['plain']:8.2f}")
            print(f"{'core-ms/image, marginal':24s}{marg['project']:10.1f}{marg['plain']:10.1f}"
                  f"{marg['project'] / max(marg['plain'], 1e-9):8.2f}")
            roles = sorted({k for job in ("project", "plain") for m in runs[(job, sizes[1])] for k in m["split"]})
            def marginal(job: str, name: str) -> float:
                """The role's extra core-ms per extra image, larger run over smaller (median over rounds)."""
                return statistics.median(1e3 * (a["split"].get(name, 0.0) - b["split"].get(name, 0.0))
                                         / (sizes[1] - sizes[0]) for a, b in zip(runs[(job, sizes[1])],
                                                                                 runs[(job, sizes[0])]))

            print(f"  stage split, core-ms/image at {sizes[1]} images (marginal in brackets):")
            for name in roles:
                vals = [statistics.median(1e3 * m["split"].get(name, 0.0) / sizes[1] for m in runs[(job, sizes[1])])
                        for job in ("project", "plain")]
                extra = [marginal(job, name) for job in ("project", "plain")]
                print(f"  {name:22s}{vals[0]:10.1f}{vals[1]:10.1f}    ({extra[0]:.1f} vs {extra[1]:.1f})")
            # driver marginal d core-ms per image at 100 images/s is 100 d ms per s: 10 d % of a core
            share = [10 * marginal(job, "driver") for job in ("project", "plain")]
            print(f"  {'driver % core/100 im/s':22s}{share[0]:10.1f}{share[1]:10.1f}    (its marginal, x 10)")
            print("  driver by thread, % core/100 im/s:")
            print_driver_threads(runs, sizes)
            steady = [streaming_share(runs, job, sizes) for job in ("project", "plain")]
            print(f"  {'driver while streaming':22s}{steady[0][2]:10.1f}{steady[1][2]:10.1f}    (% core/100 im/s: "
                  f"{steady[0][0]:.1f}% vs {steady[1][0]:.1f}% of a core at {steady[0][1]:.0f} vs {steady[1][1]:.0f} "
                  f"images/s)")
            procs = [statistics.median(m["processes"] for m in runs[(job, sizes[1])]) for job in ("project", "plain")]
            print(f"  {'processes (count)':22s}{procs[0]:10.0f}{procs[1]:10.0f}")
            wall = [statistics.median(m["wall_s"] for m in runs[(job, sizes[1])]) for job in ("project", "plain")]
            print(f"  {'wall s (shared cores)':22s}{wall[0]:10.1f}{wall[1]:10.1f}\n", flush=True)
            headline[fmt] = {"project": round(per["project"], 2), "plain": round(per["plain"], 2)}
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
