"""The batch job: the one place that builds the Ray Data graph and sets its resources.

    inputs (sorted, sharded) ─> read_images (CPU tasks) ─> InferenceActor pool (GPU or CPU actors)
        ─> encode_and_stage (CPU tasks: RLE strings, rows, a staged Parquet fragment per shard)
        ─> driver: fragment paths + image ids only ─> publish_shard (Ray tasks: tables + marker)

Why the driver decides and workers write: Ray Data streams rows in no guaranteed order, so a
shard's images arrive in several batches. Workers stage each batch's rows as fragments and send
the driver their paths and image ids (a few hundred bytes per batch). The driver tracks, per
shard, which images it has; when a shard is complete it starts a publish task that writes the
shard's Parquet files and then its commit marker (pipeline/sink.py). One process deciding makes
"exactly once" easy to reason about: a shard is published once per run, from fragments the
driver chose (a retried task's duplicate rows are left out), and a re-run skips shards whose
marker exists. Driver memory holds only the shards in flight, not the rows.

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
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ifcn import checkpoint_digest, load_checkpoint
from ifcn.image import one_line

from .config import IncompleteRunError, SegmentConfig, SegmentError
from .infer import InferenceActor
from .reduce import InferAndEncodeActor, encode_and_stage
from .schema import FORMAT
from .lease import Lease
from .sink import JOB_FILE, MANIFEST_FILE, SUCCESS_FILE, Fragment, OutputStore, publish_shard
from .sources import Listing, Shard, Span, list_inputs, read_images

READ_BATCH = 4  # images per read call: small, so decoded pixels stream to the actors early
ENCODE_BATCH = 16  # images per encoding call: compressing 1000 masks' runs takes a few ms per image
GPU_BATCH = 16  # images per GPU actor call: the H100 forward ran 166 images/s at batch 16, 158 at 8
CPU_BATCH = 4  # images per CPU actor call: one image is already seconds of work
READ_CPUS = 0.5  # reading is half waiting on storage, so two read tasks share a core
MAX_INPUT_BLOCKS = 2000  # listing blocks: enough parallelism, few enough objects for millions of inputs
PUBLISH_CPUS = 0.25  # a publish task mostly waits on storage; Parquet encoding is a few ms per image
PUBLISH_RETRIES = 3  # a publish task whose worker dies or whose storage call fails runs again


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before any work starts."""

    listing: Listing
    skipped: dict[str, int]  # prefix keys that are not images, by extension
    shards: list[Span]
    pending: list[Span]  # shards without a commit marker
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
    listing = list_inputs(config.input, so, skipped)
    shards = listing.spans(config.shard_size)
    job = {"format": FORMAT, "inputs_sha256": listing.digest(), "num_inputs": len(listing),
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
        if sid not in by_id or marker.get("digest") != listing.digest(by_id[sid].start, by_id[sid].stop):
            raise SegmentError(f"--output {config.output}: commit marker of shard {sid} does not match this "
                               f"input listing; use a new --output, or delete it to start over")
    pending = [s for s in shards if s.shard_id not in committed]
    return Plan(listing, dict(sorted(skipped.items())), shards, pending, store, job, sha, model_config, committed,
                rewrite_job)


@dataclass(frozen=True)
class Resources:
    """How the inference stage is spread over the cluster (decided once, logged, put in the manifest)."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    postprocess_in_actor: bool  # RLE strings and rows made inside the actors instead of CPU tasks
    batch_size: int = CPU_BATCH  # images per actor call


def resolve_resources(config: SegmentConfig, cluster: dict[str, float],
                      node_cpus: list[float] | None = None) -> Resources:
    """One GPU actor per GPU with encoding tasks behind them; without GPUs, one CPU actor per core
    that also encodes (a CPU actor would otherwise idle a core while tasks queue).

    node_cpus: CPUs of each alive node. A CPU actor never takes so much of its node that a read
    task cannot start beside it: on 1-CPU nodes, actors of 0.75 CPU would leave every node 0.25
    free and the job would wait forever for a read task's 0.5 (a two-node test found it).
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
        cpus_per_actor = max(0.25, min(1.0, (cpus - READ_CPUS) / actors,
                                       min(node_cpus or [cpus]) - READ_CPUS))
    batch = config.batch_size or (GPU_BATCH if per_actor > 0 else CPU_BATCH)
    return Resources(actors, per_actor, cpus_per_actor, in_actor, batch)


def build_dataset(plan: Plan, config: SegmentConfig, res: Resources, run_id: str):
    """The Ray Data graph over the pending shards' images (lazy; iterate it to run). Its rows are
    FRAGMENT_SCHEMA: the staged fragments' paths and image ids, never masks."""
    import ray.data

    rows = pending_rows(plan)
    per_block = max(READ_BATCH, math.ceil(rows.num_rows / MAX_INPUT_BLOCKS))
    # Copies (take), not slices of one table: a pickled slice can carry its parent's whole buffers.
    ds = ray.data.from_arrow([rows.take(pa.array(range(i, min(i + per_block, rows.num_rows)), pa.int64()))
                              for i in range(0, rows.num_rows, per_block)])
    ds = ds.map_batches(
        # READ_CPUS != the actors' num_cpus also keeps Ray Data from fusing this stage into the
        # actor stage (it fuses task -> actor stages with equal resources): decoding stays in tasks.
        read_images, batch_format="pyarrow", batch_size=READ_BATCH, num_cpus=READ_CPUS,
        fn_kwargs={"storage_options": config.storage_options, "max_pixels": config.max_pixels,
                   "min_side": config.min_side})
    stage = {"output": config.output, "storage_options": config.storage_options, "run_id": run_id}
    actor_kwargs = {"checkpoint": config.checkpoint, "inference": config.inference.to_dict(),
                    "storage_options": config.storage_options, "amp": config.amp,
                    "torch_threads": max(1, int(res.cpus_per_actor)), "compile": config.compile,
                    "checkpoint_sha256": plan.checkpoint_sha256}
    ds = ds.map_batches(
        InferAndEncodeActor if res.postprocess_in_actor else InferenceActor, batch_format="pyarrow",
        batch_size=res.batch_size, compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor,
        fn_constructor_kwargs={**actor_kwargs, "stage": stage} if res.postprocess_in_actor else actor_kwargs)
    if res.postprocess_in_actor:
        return ds
    return ds.map_batches(encode_and_stage, batch_format="pyarrow", batch_size=ENCODE_BATCH, num_cpus=1,
                          fn_kwargs=stage)


def pending_rows(plan: Plan) -> pa.Table:
    """(image_id, uri, shard_id) of every pending shard's images, in listing order (columnar)."""
    listing = plan.listing
    spans = plan.pending
    take = pa.array(np.concatenate([np.arange(s.start, s.stop) for s in spans]) if spans else [], pa.int64())
    shard_ids = pa.array([s.shard_id for s in spans], pa.string())
    which = pa.array(np.repeat(np.arange(len(spans)), [len(s) for s in spans]), pa.int64())
    return pa.table({"image_id": listing.image_ids.take(take), "uri": listing.uris.take(take),
                     "shard_id": shard_ids.take(which)})


class InlinePublisher:
    """Publishes in this process, one shard at a time (tests; no Ray needed)."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None) -> None:
        self.output, self.storage_options = output, storage_options
        self.done: list[dict[str, Any]] = []

    def submit(self, shard: Shard, fragments: list[Fragment]) -> None:
        self.done.append(publish_shard(self.output, self.storage_options, shard, fragments))

    def poll(self, wait: bool = False) -> list[dict[str, Any]]:
        done, self.done = self.done, []
        return done


class RayPublisher:
    """Publishes each complete shard in a Ray task, many at a time, off the driver."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None) -> None:
        import ray

        self.output, self.storage_options = output, storage_options
        self.task = ray.remote(num_cpus=PUBLISH_CPUS, max_retries=PUBLISH_RETRIES,
                               retry_exceptions=True)(publish_shard)
        self.in_flight: dict[Any, str] = {}  # ObjectRef -> shard_id

    def submit(self, shard: Shard, fragments: list[Fragment]) -> None:
        ref = self.task.remote(self.output, self.storage_options, shard, fragments)
        self.in_flight[ref] = shard.shard_id

    def poll(self, wait: bool = False) -> list[dict[str, Any]]:
        """Markers of the publish tasks that finished (all of them if `wait`)."""
        import ray

        if not self.in_flight:
            return []
        refs = list(self.in_flight)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        markers = []
        for ref in ready:
            sid = self.in_flight.pop(ref)
            try:
                markers.append(ray.get(ref))
            except Exception as e:
                raise IncompleteRunError(f"shard {sid}: publishing failed after {PUBLISH_RETRIES} retries "
                                   f"({one_line(e)}); re-run the same command to finish it") from None
        return markers


class ShardCollector:
    """The driver's bookkeeping: which images of each shard are staged, and in which fragments.

    A shard is handed to the publisher once all of its images have arrived; an image delivered
    twice (a retried task) is taken from its first fragment only. A shard with an image that
    failed transiently is left unpublished (`left`), so a re-run retries it whole."""

    def __init__(self, shards: list[Span], listing: Listing, publisher: InlinePublisher | RayPublisher,
                 log: Callable[[str], None]) -> None:
        self.shards = {s.shard_id: s for s in shards}
        self.listing = listing
        self.publisher, self.log = publisher, log
        self.fragments: dict[str, list[Fragment]] = {}
        self.seen: dict[str, set[str]] = {}
        self.markers: list[dict[str, Any]] = []
        self.submitted: set[str] = set()
        self.done: set[str] = set()
        self.left: dict[str, tuple[int, str]] = {}  # shard_id -> (images failed transiently, first reason)

    def add(self, batch: pa.Table) -> None:
        """FRAGMENT_SCHEMA rows from the workers."""
        for row in batch.to_pylist():
            sid = row["shard_id"]
            if sid in self.submitted:  # a retried task delivered images of a published shard again
                continue
            seen = self.seen.setdefault(sid, set())
            fresh = tuple(i for i in dict.fromkeys(row["image_ids"]) if i not in seen)
            retry = [i for i in dict.fromkeys(row["retry_ids"]) if i not in seen and i not in fresh]
            if not fresh and not retry:
                continue
            seen.update(fresh)
            seen.update(retry)
            if fresh:
                self.fragments.setdefault(sid, []).append(Fragment(row["path"], fresh))
            if retry:
                n, reason = self.left.get(sid, (0, row["retry_error"]))
                self.left[sid] = (n + len(retry), reason)
            if len(seen) == len(self.shards[sid]):
                self.submitted.add(sid)
                del self.seen[sid]
                fragments = self.fragments.pop(sid, [])
                if sid in self.left:
                    n, reason = self.left[sid]
                    self.log(f"shard {sid} left uncommitted: {n} image(s) failed transiently ({reason})")
                else:
                    self.publisher.submit(self.listing.shard(self.shards[sid]), fragments)
        self.collect()

    def collect(self, wait: bool = False) -> None:
        """Records (and logs) the shards whose publish task has finished."""
        for marker in self.publisher.poll(wait):
            self.done.add(marker["shard_id"])
            self.markers.append(marker)
            self.log(f"committed shard {marker['shard_id']}: {marker['num_images']} images "
                     f"({marker['num_error']} errors), {marker['num_proposals']} proposals "
                     f"[{len(self.markers)}/{len(self.shards)} this run]")

    def missing(self) -> list[str]:
        """Shards that neither committed nor were left for a re-run."""
        return sorted(set(self.shards) - self.done - set(self.left))


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
    log(f"{len(plan.listing)} images in {len(plan.shards)} shards of {config.shard_size}; "
        f"{skipped} already committed, {len(plan.pending)} to run" + _skipped_note(plan.skipped))
    collector = None
    run_s, res = 0.0, Resources(0, 0.0, 0.0, False, 0)  # nothing to run: no actors
    if plan.pending:
        import ray

        if not ray.is_initialized():
            ray.init()
        cluster = ray.cluster_resources()
        node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        res = resolve_resources(config, cluster, [c for c in node_cpus if c > 0])
        log(f"inference: {res.actors} actor(s), {res.gpus_per_actor} GPU each, batch size {res.batch_size}, "
            f"{config.inference.nms} NMS in the actors; RLE strings in "
            f"{'the actors' if res.postprocess_in_actor else 'CPU tasks'}")
        if (res.actors * res.gpus_per_actor > cluster.get("GPU", 0)
                or res.actors * res.cpus_per_actor > cluster.get("CPU", 0)):
            log(f"warning: {res.actors} actors x {res.gpus_per_actor} GPU need more than the cluster has now "
                f"({cluster.get('GPU', 0)} GPU, {cluster.get('CPU', 0)} CPU); they wait for an autoscaler")
        collector = ShardCollector(plan.pending, plan.listing, RayPublisher(config.output, config.storage_options),
                                   log)
        ds = build_dataset(plan, config, res, run_id=uuid.uuid4().hex[:12])
        run_start = time.perf_counter()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(batch)
        collector.collect(wait=True)
        run_s = time.perf_counter() - run_start
        if collector.missing():
            raise IncompleteRunError(f"shards {collector.missing()[:10]} did not receive all their images; "
                                     f"re-run the same command to finish them")
    wall = time.perf_counter() - start
    this_run = collector.markers if collector else []
    left = collector.left if collector else {}
    markers = {**plan.committed, **{m["shard_id"]: m for m in this_run}}  # no second read of every marker
    counts = {"images": sum(m["num_images"] for m in markers.values()),
              "images_ok": sum(m["num_ok"] for m in markers.values()),
              "images_error": sum(m["num_error"] for m in markers.values()),
              "proposals": sum(m["num_proposals"] for m in markers.values()),
              "shards": len(markers), "shards_skipped": skipped}
    counts["shards_run"] = len(this_run)
    processed = sum(m["num_images"] for m in this_run)
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
        "inputs_sha256": plan.job["inputs_sha256"], "num_inputs": len(plan.listing), "counts": counts,
        "skipped_keys": plan.skipped,
        "last_run": {k: summary[k] for k in ("images_this_run", "wall_s", "images_per_s", "pipeline_s",
                                             "pipeline_images_per_s", "actors", "gpus_per_actor")},
        "tables": {"masks": "masks/*.parquet", "images": "images/*.parquet"},
        "left_for_retry": {sid: {"images": n, "reason": r} for sid, (n, r) in left.items()},
        "versions": versions()})
    if left:
        n = sum(k for k, _ in left.values())
        first = next(iter(left.values()))[1]
        raise IncompleteRunError(f"{n} image(s) in {len(left)} shard(s) failed with transient errors (e.g. {first}); "
                                 f"the other shards are committed; re-run the same command to retry them")
    lease.release()  # before _SUCCESS: a complete output has no live owner
    plan.store.mark_success()  # last: Hadoop/Spark's "this output is complete"
    plan.store.remove_tmp()
    return summary


def describe_plan(plan: Plan, config: SegmentConfig) -> str:
    """What --dry-run prints: the plan in a few lines; nothing has been written or started."""
    todo = sum(len(s) for s in plan.pending)
    lines = [f"input {config.input}: {len(plan.listing)} images" + _skipped_note(plan.skipped),
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
