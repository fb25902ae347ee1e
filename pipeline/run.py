"""The batch job: the one place that builds the Ray Data graph and sets its resources.

    inputs (sorted, sharded) ─> read_images (CPU tasks) ─> InferenceActor pool (GPU or CPU actors)
        ─> reduce_batch (CPU tasks) ─> driver: collect rows per shard, commit each complete shard

Why the driver commits: Ray Data streams rows of one image each, in no guaranteed order. The
driver iterates the last stage (`iter_batches`), buffers rows per shard, and commits a shard
(pipeline/sink.py: temp files, move, commit marker last) as soon as all of its images have
arrived; Ray Data keeps executing in the background meanwhile, so the actors never wait on
Parquet. Commits in one process make "exactly once" easy to reason about: a shard is written
by one writer, once per run, and a re-run skips shards whose marker exists. The heavy work
(decode, forward passes, NMS, RLE) stays in Ray workers; the driver only concatenates and
writes Parquet.

Usage (the CLI is jobs/segment.py):

    from pipeline.config import SegmentConfig
    from pipeline.run import run_segment
    summary = run_segment(SegmentConfig(input="data/", output="out/", checkpoint="model.pt"))
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from ifcn import checkpoint_digest, load_checkpoint
from ifcn.image import one_line

from .config import SegmentConfig, SegmentError
from .infer import InferenceActor
from .reduce import InferAndEncodeActor, encode_batch
from .schema import FORMAT
from .lease import Lease
from .sink import JOB_FILE, MANIFEST_FILE, SUCCESS_FILE, OutputStore
from .sources import InputItem, Shard, list_inputs, listing_digest, make_shards, read_images

READ_BATCH = 4  # images per read call: small, so decoded pixels stream to the actors early
ENCODE_BATCH = 16  # images per encoding call: compressing 1000 masks' runs takes a few ms per image
GPU_BATCH = 16  # images per GPU actor call: the H100 forward ran 166 images/s at batch 16, 158 at 8
CPU_BATCH = 4  # images per CPU actor call: one image is already seconds of work
READ_CPUS = 0.5  # reading is half waiting on storage, so two read tasks share a core
MAX_INPUT_BLOCKS = 2000  # listing blocks: enough parallelism, few enough objects for millions of inputs


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before any work starts."""

    items: list[InputItem]
    skipped: dict[str, int]  # prefix keys that are not images, by extension
    shards: list[Shard]
    pending: list[Shard]  # shards without a commit marker
    store: OutputStore
    job: dict[str, Any]  # the output's fingerprint (_job.json)
    checkpoint_sha256: str
    model_config: dict[str, Any]
    committed: dict[str, dict[str, Any]]  # shard_id -> commit marker, before this run
    rewrite_job: bool  # _job.json is missing or may be replaced (nothing committed yet)


def prepare(config: SegmentConfig, lease: Lease | None = None) -> Plan:
    """Preflight (`make_plan`), then claims the output: takes `lease` (if given) before touching
    anything, writes its fingerprint, clears what an earlier run left uncommitted, and removes
    `_SUCCESS` until this run completes."""
    plan = make_plan(config)
    if lease is not None:
        lease.acquire()  # before remove_uncommitted: another live run's shards in flight are not ours
        # a run we took a stale lease from may have committed more since the plan was read
        committed = plan.store.committed()
        plan = dataclasses.replace(plan, committed=committed,
                                   pending=[s for s in plan.shards if s.shard_id not in committed])
    try:
        plan.store.remove(SUCCESS_FILE)  # a resumed run: the output is incomplete until it ends
        if plan.rewrite_job:
            plan.store.write_json(JOB_FILE, plan.job)
        plan.store.remove_uncommitted(set(plan.committed))
    except Exception as e:
        raise SegmentError(f"--output {config.output}: cannot write to it ({type(e).__name__}: {one_line(e)}); "
                           f"check permissions, credentials and --storage-options") from None
    return plan


def make_plan(config: SegmentConfig) -> Plan:
    """Checkpoint, input listing, shards, output state: read only (what --dry-run prints).
    Raises SegmentError (one line)."""
    so = config.storage_options
    try:
        sha = checkpoint_digest(config.checkpoint, so)
        model_config = load_checkpoint(config.checkpoint, so).config.to_dict()
    except Exception as e:
        raise SegmentError(f"--checkpoint {config.checkpoint}: cannot load it ({type(e).__name__}: {one_line(e)}); "
                           f"pass a file written by ifcn.save_checkpoint or jobs.train") from None
    skipped: dict[str, int] = {}
    items = list_inputs(config.input, so, skipped)
    shards = make_shards(items, config.shard_size)
    job = {"format": FORMAT, "inputs_sha256": listing_digest(items), "num_inputs": len(items),
           "num_shards": len(shards), "settings": config.result_settings(), "checkpoint_sha256": sha}
    job = json.loads(json.dumps(job))  # as it reads back from _job.json (tuples become lists)
    try:
        store = OutputStore(config.output, so)
        previous = store.read_json(JOB_FILE)
        committed = store.committed()
    except Exception as e:
        raise SegmentError(f"--output {config.output}: cannot read it ({type(e).__name__}: {one_line(e)}); "
                           f"check the URL, credentials and --storage-options") from None
    if previous is None and committed:
        raise SegmentError(f"--output {config.output} holds committed shards but no {JOB_FILE}; "
                           f"use a new --output, or delete it to start over")
    rewrite_job = previous is None
    if previous is not None:
        diffs = _job_differences(previous, job)
        rewrite_job = bool(diffs) and not committed  # nothing committed yet: nothing to conflict with
        if diffs and committed:
            raise SegmentError(f"--output {config.output} holds results of a different run ({'; '.join(diffs)}); "
                               f"use a new --output, or delete it to start over")
    by_id = {s.shard_id: s for s in shards}
    for sid, marker in committed.items():
        if sid not in by_id or marker.get("digest") != by_id[sid].digest:
            raise SegmentError(f"--output {config.output}: commit marker of shard {sid} does not match this "
                               f"input listing; use a new --output, or delete it to start over")
    pending = [s for s in shards if s.shard_id not in committed]
    return Plan(items, dict(sorted(skipped.items())), shards, pending, store, job, sha, model_config, committed,
                rewrite_job)


@dataclass(frozen=True)
class Resources:
    """How the inference stage is spread over the cluster (decided once, logged, put in the manifest)."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    postprocess_in_actor: bool  # RLE strings and rows made inside the actors instead of CPU tasks
    batch_size: int = CPU_BATCH  # images per actor call


def resolve_resources(config: SegmentConfig, cluster: dict[str, float]) -> Resources:
    """One GPU actor per GPU with encoding tasks behind them; without GPUs, one CPU actor per core
    that also encodes (a CPU actor would otherwise idle a core while tasks queue).

    On an autoscaling cluster whose GPU workers are not up yet, pass --gpus-per-actor and --actors.
    """
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    in_actor = config.postprocess == "actor" or (config.postprocess == "auto" and per_actor == 0)
    if config.actors is not None:
        actors = config.actors
    elif per_actor > 0:
        actors = max(1, int(gpus // per_actor))
    elif in_actor:
        actors = max(1, int(cpus))  # each actor runs the whole predict(): one per core
    else:
        actors = max(1, int(cpus // 2))  # leave half the CPUs to read and reduce tasks
    cpus_per_actor = 1.0
    if per_actor == 0 and in_actor:
        # Logical CPUs: leave room for one read task beside a pool that fills every core, or the
        # pool would hold all CPUs and reading (hence the job) would never start.
        cpus_per_actor = max(0.25, min(1.0, (cpus - READ_CPUS) / actors))
    batch = config.batch_size or (GPU_BATCH if per_actor > 0 else CPU_BATCH)
    return Resources(actors, per_actor, cpus_per_actor, in_actor, batch)


def build_dataset(plan: Plan, config: SegmentConfig, res: Resources):
    """The Ray Data graph over the pending shards' images (lazy; iterate it to run)."""
    import ray.data

    rows = [{"image_id": it.image_id, "uri": it.uri, "shard_id": s.shard_id} for s in plan.pending for it in s.items]
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("shard_id", pa.string())])
    per_block = max(READ_BATCH, math.ceil(len(rows) / MAX_INPUT_BLOCKS))
    # Separate tables, not slices of one: a pickled slice can carry its parent's whole buffers.
    ds = ray.data.from_arrow([pa.Table.from_pylist(rows[i:i + per_block], schema=schema)
                              for i in range(0, len(rows), per_block)])
    ds = ds.map_batches(
        # READ_CPUS != the actors' num_cpus also keeps Ray Data from fusing this stage into the
        # actor stage (it fuses task -> actor stages with equal resources): decoding stays in tasks.
        read_images, batch_format="pyarrow", batch_size=READ_BATCH, num_cpus=READ_CPUS,
        fn_kwargs={"storage_options": config.storage_options, "max_pixels": config.max_pixels,
                   "min_side": config.min_side})
    ds = ds.map_batches(
        InferAndEncodeActor if res.postprocess_in_actor else InferenceActor, batch_format="pyarrow",
        batch_size=res.batch_size, compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor,
        fn_constructor_kwargs={"checkpoint": config.checkpoint, "inference": config.inference.to_dict(),
                               "storage_options": config.storage_options, "amp": config.amp,
                               "torch_threads": max(1, int(res.cpus_per_actor)), "compile": config.compile,
                               "checkpoint_sha256": plan.checkpoint_sha256})
    if res.postprocess_in_actor:
        return ds
    return ds.map_batches(encode_batch, batch_format="pyarrow", batch_size=ENCODE_BATCH, num_cpus=1)


class ShardCollector:
    """Buffers reduced rows per shard and commits a shard once all of its images have arrived."""

    def __init__(self, shards: list[Shard], store: OutputStore, log: Callable[[str], None]) -> None:
        self.shards = {s.shard_id: s for s in shards}
        self.store, self.log = store, log
        self.parts: dict[str, list[pa.Table]] = {}
        self.seen: dict[str, set[str]] = {}
        self.markers: list[dict[str, Any]] = []
        self.done: set[str] = set()

    def add(self, batch: pa.Table) -> None:
        for sid in set(batch.column("shard_id").to_pylist()):
            if sid in self.done:  # a retried task delivered images of a committed shard again
                continue
            rows = batch.filter(pc.equal(batch.column("shard_id"), sid))
            seen = self.seen.setdefault(sid, set())
            fresh = []
            for i, image_id in enumerate(rows.column("image_id").to_pylist()):
                if image_id not in seen:  # a retried task may deliver an image twice: keep the first
                    seen.add(image_id)
                    fresh.append(i)
            if len(fresh) < rows.num_rows:
                rows = rows.take(fresh)
            self.parts.setdefault(sid, []).append(rows)
            if len(seen) == len(self.shards[sid].items):
                self._commit(sid)

    def _commit(self, sid: str) -> None:
        marker = self.store.commit(self.shards[sid], pa.concat_tables(self.parts.pop(sid)))
        self.done.add(sid)
        del self.seen[sid]
        self.markers.append(marker)
        self.log(f"committed shard {sid}: {marker['num_images']} images ({marker['num_error']} errors), "
                 f"{marker['num_proposals']} proposals [{len(self.markers)}/{len(self.shards)} this run]")

    def missing(self) -> list[str]:
        return sorted(set(self.shards) - self.done)


def run_segment(config: SegmentConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs the job (or the rest of it) and returns the summary; also writes <output>/_manifest.json.

    Starts a local Ray unless one is initialised (or RAY_ADDRESS points at a cluster).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    try:
        lease = Lease(OutputStore(config.output, config.storage_options))
    except Exception as e:
        raise SegmentError(f"--output {config.output}: cannot open it ({type(e).__name__}: {one_line(e)}); "
                           f"check the URL and --storage-options") from None
    try:
        return _run(config, log, lease, start)
    finally:
        lease.release()


def _run(config: SegmentConfig, log: Callable[[str], None], lease: Lease, start: float) -> dict[str, Any]:
    plan = prepare(config, lease)
    skipped = len(plan.shards) - len(plan.pending)
    log(f"{len(plan.items)} images in {len(plan.shards)} shards of {config.shard_size}; "
        f"{skipped} already committed, {len(plan.pending)} to run" + _skipped_note(plan.skipped))
    collector = ShardCollector(plan.pending, plan.store, log)
    run_s, res = 0.0, Resources(0, 0.0, 0.0, False, 0)  # nothing to run: no actors
    if plan.pending:
        import ray

        if not ray.is_initialized():
            ray.init()
        cluster = ray.cluster_resources()
        res = resolve_resources(config, cluster)
        log(f"inference: {res.actors} actor(s), {res.gpus_per_actor} GPU each, batch size {res.batch_size}, "
            f"{config.inference.nms} NMS in the actors; RLE strings in "
            f"{'the actors' if res.postprocess_in_actor else 'CPU tasks'}")
        if (res.actors * res.gpus_per_actor > cluster.get("GPU", 0)
                or res.actors * res.cpus_per_actor > cluster.get("CPU", 0)):
            log(f"warning: {res.actors} actors x {res.gpus_per_actor} GPU need more than the cluster has now "
                f"({cluster.get('GPU', 0)} GPU, {cluster.get('CPU', 0)} CPU); they wait for an autoscaler")
        ds = build_dataset(plan, config, res)
        run_start = time.perf_counter()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(batch)
        run_s = time.perf_counter() - run_start
        if collector.missing():
            raise SegmentError(f"shards {collector.missing()[:10]} did not receive all their images; "
                               f"re-run the same command to finish them")
    wall = time.perf_counter() - start
    markers = plan.store.committed()
    counts = {"images": sum(m["num_images"] for m in markers.values()),
              "images_ok": sum(m["num_ok"] for m in markers.values()),
              "images_error": sum(m["num_error"] for m in markers.values()),
              "proposals": sum(m["num_proposals"] for m in markers.values()),
              "shards": len(markers), "shards_skipped": skipped, "shards_run": len(collector.markers)}
    processed = sum(m["num_images"] for m in collector.markers)
    summary = {"output": config.output, **counts, "images_this_run": processed, "wall_s": round(wall, 3),
               "images_per_s": round(processed / wall, 3) if wall > 0 else 0.0,
               # the Ray Data execution alone (no listing, checkpoint check or Ray start-up)
               "pipeline_s": round(run_s, 3), "pipeline_images_per_s": round(processed / run_s, 3) if run_s else 0.0,
               "actors": res.actors, "gpus_per_actor": res.gpus_per_actor,
               "postprocess": "actor" if res.postprocess_in_actor else "tasks", "skipped_keys": plan.skipped,
               "error_rate": round(counts["images_error"] / max(1, counts["images"]), 4)}
    plan.store.write_json(MANIFEST_FILE, {
        "format": FORMAT, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": config.input, "output": config.output, "config": config.to_dict(),
        "checkpoint": {"url": config.checkpoint, "sha256": plan.checkpoint_sha256, "model": plan.model_config},
        "inputs_sha256": plan.job["inputs_sha256"], "num_inputs": len(plan.items), "counts": counts,
        "skipped_keys": plan.skipped,
        "last_run": {k: summary[k] for k in ("images_this_run", "wall_s", "images_per_s", "pipeline_s",
                                             "pipeline_images_per_s", "actors", "gpus_per_actor")},
        "tables": {"masks": "masks/*.parquet", "images": "images/*.parquet"},
        "versions": versions()})
    lease.release()  # no heartbeat may write through _tmp/ after this
    plan.store.mark_success()  # last: Hadoop/Spark's "this output is complete"
    plan.store.remove_tmp()
    return summary


def describe_plan(plan: Plan, config: SegmentConfig) -> str:
    """What --dry-run prints: the plan in a few lines; nothing has been written or started."""
    todo = sum(len(s.items) for s in plan.pending)
    lines = [f"input {config.input}: {len(plan.items)} images" + _skipped_note(plan.skipped),
             f"output {config.output}: {len(plan.shards)} shards of {config.shard_size}, "
             f"{len(plan.committed)} committed, {len(plan.pending)} to run ({todo} images)",
             f"checkpoint {config.checkpoint}: sha256 {plan.checkpoint_sha256[:12]}..., "
             f"backbone {plan.model_config.get('backbone')}",
             f"inference: {json.dumps(config.inference.to_dict(), sort_keys=True)}",
             "dry run: nothing written, no workers started"]
    return "\n".join(lines)


def _skipped_note(skipped: dict[str, int]) -> str:
    if not skipped:
        return ""
    parts = ", ".join(f"{n} {ext or '(no extension)'}" for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return f"; skipped keys that are not images: {parts}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, dist in (("ifcn", "instancefcn"), ("torch", "torch"), ("ray", "ray"), ("pyarrow", "pyarrow")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _job_differences(previous: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """Human-readable differences between an output's fingerprint and this run's."""
    diffs = []
    if previous.get("format") != job["format"]:
        diffs.append(f"format: {previous.get('format')} before, {job['format']} now")
    if previous.get("inputs_sha256") != job["inputs_sha256"]:
        diffs.append(f"input listing differs ({previous.get('num_inputs')} images before, {job['num_inputs']} now)")
    if previous.get("checkpoint_sha256") != job["checkpoint_sha256"]:
        diffs.append("checkpoint differs (sha256)")
    old, new = previous.get("settings", {}), job["settings"]
    for key in sorted(set(old) | set(new)):
        if key == "inference":
            a, b = old.get(key, {}), new.get(key, {})
            diffs += [f"{k}: {a.get(k)} before, {b.get(k)} now"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)} before, {new.get(key)} now")
    return diffs
