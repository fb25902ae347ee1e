"""The batch job's driver: the one place that builds the Ray Data graph, sets its resources and
decides when shards commit.

    plan, part by part while the input is listed (pipeline/planning/stream.py: each listing part
    snapshotted, then its pending images from the images table)
        ─> feed (pipeline/stages/feed.py: a queue the graph's read tasks drain; the graph lives for the run)
        ─> read_images (CPU tasks) ─> InferenceActor pool (GPU or CPU actors)
        ─> encode_and_stage (CPU tasks: RLE strings, rows, a staged Parquet fragment per shard)
        ─> driver: fragment paths + image ids only ─> publish_shard (Ray tasks: one data file per shard)
        ─> driver: group commits to the Delta table (pipeline/tables/delta.py), each swapping the old
           files of the images it replaces for rewrites without them (rewrite_file, Ray tasks)

Why the driver decides and workers write: Ray Data streams rows in no guaranteed order, so a
shard's images arrive in several batches. Workers stage each batch's rows as fragments and send
the driver their paths and image ids (a few hundred bytes per batch). The driver tracks, per
shard, which images it has; when a shard is complete it starts a publish task that writes the
shard's data files, and it commits finished shards in groups (every `commit_every_s` or
`commit_shards` shards, whichever comes first: at 64 GPUs ~75 shards/s finish, more than one
commit per shard can keep up with). One process deciding makes "exactly once" easy to reason
about: a shard is published once per run, from fragments the driver chose (a retried task's
duplicate rows are left out). Driver memory holds only the shards in flight, not the rows.

Usage (the CLI is jobs/segment.py):

    from pipeline.config import SegmentConfig
    from pipeline.run import run_segment
    summary = run_segment(SegmentConfig(input="data/", output="out/", checkpoint="model.pt"))
"""
from __future__ import annotations

import importlib.metadata
import math
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifcn.image import one_line

from pipeline.planning.plan import Classifier, Plan, images_state, new_run_id, now_utc, prepare, skipped_note
from pipeline.planning.sources import Listing, Shard, Span
from pipeline.planning.stream import PlanStream
from pipeline.stages.feed import Feed
from pipeline.stages.read import read_images
from pipeline.stages.sink import Fragment, publish_shard, rewrite_file
from pipeline.tables.delta import OutputTables, Replacements
from pipeline.tables.lease import Lease

from .config import CONCURRENT_CALLS, IncompleteRunError, SegmentConfig, SegmentError
from .errors import RETRY
from .progress import status_lines

# Images per read task (input block): READ_BATCH to READ_BLOCK_MAX, as many as still leave BLOCKS_PER_ACTOR
# blocks per inference actor (`read_block_rows`), so the executor handles ~8 read tasks per thousand
# images on a GPU node, not 250 (each task costs the driver's executor loop ~2 ms of CPU and the raylet
# more: bench/cpu_side.py). A read task decodes its block in one call (up to READ_BLOCK_MAX images): its
# output is then one Arrow chunk, which Ray Data slices into actor batches without a copy (a block of
# several chunks is combined, i.e. every image's pixels copied, before it is split).
READ_BATCH = 32
READ_BLOCK_MAX = 128
BLOCKS_PER_ACTOR = 4  # small jobs keep every CPU actor fed
# Images per encoding task: None = each block the actors emit as it is (~90 480x640 images of 1000
# proposals, 128 small ones). A batch size that splits those multi-chunk blocks made Ray Data copy
# them whole (~1.4 MB of runs per image) and cost ~2-3 core-ms per image more (bench/cpu_side.py).
ENCODE_BATCH = None
ENCODE_CPUS = 1.0  # an encoding task is pure CPU work
GPU_BATCH = 16  # images per GPU actor call: the H100 forward ran 166 images/s at batch 16, 158 at 8
CPU_BATCH = 4  # images per CPU actor call: one image is already seconds of work
READ_CPUS = 0.5  # reading is half waiting on storage, so two read tasks share a core
MIN_ACTOR_CPUS = 0.25  # a CPU actor's smallest logical share (torch still uses its threads)
MAX_INPUT_BLOCKS = 2000  # listing blocks: enough parallelism, few enough objects for millions of inputs
PUBLISH_CPUS = 0.5  # a publish task waits on storage and encodes Parquet (~1 ms per image); 0.25 let 4 run per free
# core, and every concurrent task is a worker process Ray starts (~0.5-1 CPU-s each: bench/cpu_side.py)
PUBLISH_RETRIES = 3  # a publish task whose worker dies or whose storage call fails runs again
SPREAD_WAIT_S = 60.0  # how long the CPU actors' placement group may take before the job goes without it


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
    if per_actor == 0:
        # Logical CPUs: leave room for one read task (and, with tasks, one encoding task) beside a
        # pool that fills every core, or the pool would hold all CPUs and the job would wait forever
        # (2 actors of 1 CPU with --postprocess tasks on 2 cores did: nothing was ever read).
        reserve = READ_CPUS + (0.0 if in_actor else ENCODE_CPUS)
        cpus_per_actor = max(MIN_ACTOR_CPUS, min(1.0, (cpus - reserve) / actors,
                                                 min(node_cpus or [cpus]) - READ_CPUS))
        if actors * cpus_per_actor + reserve > cpus:
            raise SegmentError(f"--actors {actors} CPU actors with --postprocess {'actor' if in_actor else 'tasks'} "
                               f"need {actors * MIN_ACTOR_CPUS + reserve:g} CPUs (with a read"
                               f"{'' if in_actor else ' and an encoding'} task), the cluster has {cpus:g}; "
                               f"use fewer --actors" + ("" if in_actor else " or --postprocess actor"))
    batch = config.batch_size or (GPU_BATCH if per_actor > 0 else CPU_BATCH)
    return Resources(actors, per_actor, cpus_per_actor, in_actor, batch)


def read_block_rows(images: int, actors: int) -> int:
    """Images per input block, i.e. per read task (READ_BATCH above)."""
    balanced = math.ceil(images / (BLOCKS_PER_ACTOR * max(1, actors)))
    return max(min(max(balanced, READ_BATCH), READ_BLOCK_MAX), math.ceil(images / MAX_INPUT_BLOCKS))


def build_dataset(ds, plan: Plan, config: SegmentConfig, res: Resources, placement: Any = None):
    """The Ray Data graph over `ds` (the feed's blocks of `read_block_rows` images; lazy: iterate it
    to run). Its rows are FRAGMENT_SCHEMA: the staged fragments' paths and image ids, never masks.
    placement: a scheduling strategy for the inference actors (`spread_actors`), or None."""
    import ray.data

    # the actor classes by name only (pipeline/stages/actors.py): the driver never imports torch (~490 MiB of RSS)
    from pipeline.stages.actors import InferAndEncodeActor, InferenceActor
    from pipeline.stages.encode import encode_and_stage

    ds = ds.map_batches(
        # READ_CPUS != the actors' num_cpus also keeps Ray Data from fusing this stage into the
        # actor stage (it fuses task -> actor stages with equal resources): decoding stays in tasks.
        # CPU actors given exactly READ_CPUS (two on two 1-CPU nodes) do fuse: they decode themselves.
        # batch_size None: each feed block (at most READ_BLOCK_MAX images) in one call, as it comes; a
        # batch size would hold a part's last, smaller block back until later parts' rows arrive
        read_images, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
        fn_kwargs={"storage_options": config.storage_options, "max_pixels": config.max_pixels,
                   "min_side": config.min_side})
    stage = {"output": config.output, "storage_options": config.storage_options, "run_id": plan.run_id}
    actor_kwargs = {"checkpoint": config.checkpoint, "inference": config.inference.to_dict(),
                    "storage_options": config.storage_options, "amp": config.amp,
                    "torch_threads": max(1, int(res.cpus_per_actor)), "compile": config.compile,
                    "checkpoint_sha256": plan.checkpoint_sha256, "predictor_factory": config.predictor_factory}
    ds = ds.map_batches(
        InferAndEncodeActor if res.postprocess_in_actor else InferenceActor, batch_format="pyarrow",
        batch_size=res.batch_size, compute=ray.data.ActorPoolStrategy(size=res.actors, **_overlap(res)),
        num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor,
        **({"scheduling_strategy": placement} if placement is not None else {}),
        fn_constructor_kwargs={**actor_kwargs, "stage": stage} if res.postprocess_in_actor else actor_kwargs)
    if res.postprocess_in_actor:
        return ds
    return ds.map_batches(encode_and_stage, batch_format="pyarrow", batch_size=ENCODE_BATCH, num_cpus=ENCODE_CPUS,
                          fn_kwargs=stage)


def _overlap(res: Resources) -> dict[str, Any]:
    """GPU actors take CONCURRENT_CALLS calls at once: one batch's host work (pinned staging,
    packing) overlaps the next batch's device work, which runs on the actor's one device thread
    (pipeline/stages/infer.py). CPU actors run one call at a time: their host and device are the same cores."""
    if res.gpus_per_actor <= 0:
        return {}
    return {"max_concurrent_calls_per_actor": CONCURRENT_CALLS, "enable_true_multi_threading": True}


@contextmanager
def spread_actors(res: Resources, node_cpus: list[float], log: Callable[[str], None]) -> Iterator[Any]:
    """A placement group of one bundle per CPU actor, spread over the nodes, while the job runs.

    Ray Data's default actor placement (SPREAD) is best effort: on two 1-CPU nodes, with actors of
    0.5 CPU, both actors landed on one node while read tasks held the other (a CI run of the
    two-node test), so one core did all the inference. Bundles are placed all at once, before any
    task holds a node: one per node where there are no more actors than nodes (STRICT_SPREAD),
    else as evenly as Ray can (SPREAD); an actor that dies restarts into its freed bundle. GPU
    actors need none (a GPU pins them), nor does one node. Yields the actors' scheduling strategy,
    or None where no group is needed or it cannot be placed in SPREAD_WAIT_S."""
    if res.gpus_per_actor > 0 or res.actors < 2 or len(node_cpus) < 2:
        yield None
        return
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # SPREAD alone put both bundles on one node too (a node's freed CPUs reach the scheduler late)
    strategy = "STRICT_SPREAD" if res.actors <= len(node_cpus) else "SPREAD"
    group = placement_group([{"CPU": res.cpus_per_actor}] * res.actors, strategy=strategy)
    try:
        ready, _ = ray.wait([group.ready()], timeout=SPREAD_WAIT_S)
        if ready:
            yield PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=False)
        else:
            log(f"warning: {res.actors} CPU actors could not be spread over the nodes in {SPREAD_WAIT_S:.0f} s; "
                f"Ray places them as it can")
            yield None
    finally:
        remove_placement_group(group)


def pending_rows(listing: Listing, spans: list[Span]) -> pa.Table:
    """(image_id, uri, shard_id) of the shards `spans` of `listing`, in listing order (columnar)."""
    take = pa.array(np.concatenate([np.arange(s.start, s.stop) for s in spans]) if spans else [], pa.int64())
    shard_ids = pa.array([s.shard_id for s in spans], pa.string())
    which = pa.array(np.repeat(np.arange(len(spans)), [len(s) for s in spans]), pa.int64())
    return pa.table({"image_id": listing.image_ids.take(take), "uri": listing.uris.take(take),
                     "shard_id": shard_ids.take(which)})


class InlinePublisher:
    """Publishes in this process, one shard at a time (tests; no Ray needed)."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None, run_id: str) -> None:
        self.args = (output, storage_options)
        self.run_id = run_id
        self.done: list[dict[str, Any]] = []

    def submit(self, shard: Shard, fragments: list[Fragment]) -> None:
        self.done.append(publish_shard(*self.args, shard, fragments, self.run_id))

    def poll(self, wait: bool = False) -> list[dict[str, Any]]:
        done, self.done = self.done, []
        return done

    def rewrite(self, drops: dict[str, list[str]]) -> list[tuple[str, dict[str, Any] | None]]:
        return [rewrite_file(*self.args, path, ids, self.run_id) for path, ids in drops.items()]


class RayPublisher:
    """Publishes each complete shard in a Ray task, many at a time, off the driver."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None, run_id: str) -> None:
        import ray

        self.args = (output, storage_options)
        self.run_id = run_id
        self.task = ray.remote(num_cpus=PUBLISH_CPUS, max_retries=PUBLISH_RETRIES,
                               retry_exceptions=True)(publish_shard)
        self.rewrite_task = ray.remote(num_cpus=PUBLISH_CPUS, max_retries=PUBLISH_RETRIES,
                                       retry_exceptions=True)(rewrite_file)
        self.in_flight: dict[Any, str] = {}  # ObjectRef -> shard_id

    def rewrite(self, drops: dict[str, list[str]]) -> list[tuple[str, dict[str, Any] | None]]:
        """Old data files rewritten without the images `drops` names (path -> ids), in Ray tasks."""
        import ray

        refs = [self.rewrite_task.remote(*self.args, path, ids, self.run_id) for path, ids in drops.items()]
        try:
            return ray.get(refs)
        except Exception as e:
            raise IncompleteRunError(f"rewriting {len(refs)} data file(s) without replaced images failed after "
                                     f"{PUBLISH_RETRIES} retries ({one_line(e)}); re-run the same command") from None

    def submit(self, shard: Shard, fragments: list[Fragment]) -> None:
        ref = self.task.remote(*self.args, shard, fragments, self.run_id)
        self.in_flight[ref] = shard.shard_id

    def poll(self, wait: bool = False) -> list[dict[str, Any]]:
        """Results (add-action facts and counts) of the publish tasks that finished (all if `wait`)."""
        import ray

        if not self.in_flight:
            return []
        refs = list(self.in_flight)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        results = []
        for ref in ready:
            sid = self.in_flight.pop(ref)
            try:
                results.append(ray.get(ref))
            except Exception as e:
                raise IncompleteRunError(f"shard {sid}: publishing failed after {PUBLISH_RETRIES} retries "
                                         f"({one_line(e)}); re-run the same command to finish it") from None
        return results


COUNTS = ("shards", "num_images", "num_ok", "num_error", "num_retry", "num_proposals")


class CommitTicker:
    """Commits finished publishes while no batch arrives: a stage that stalls (a slow GPU, a held
    actor) must not hold shards that are already written out of the table, where a kill would lose
    them. Every `every_s` a thread does what a new batch does, under the one lock both share; an
    error it meets (a lost lease) is raised in the driver's loop."""

    def __init__(self, collector: ShardCollector, committer: GroupCommitter, every_s: float = 0.5) -> None:
        self.collector, self.committer, self.every_s = collector, committer, every_s
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="ifcn-commit-ticker", daemon=True)

    def step(self, batch: pa.Table | None = None) -> None:
        with self.lock:
            if self.error is not None:
                raise self.error
            if batch is None:
                self.collector.collect()
            else:
                self.collector.add(batch)
            self.committer.add(self.collector.take())

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.step()
            except BaseException as e:  # noqa: BLE001 - handed to the driver's loop
                self.error = self.error or e
                return

    def __enter__(self) -> CommitTicker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None and self.error is not None:
            raise self.error


class GroupCommitter:
    """Commits published shards to the table in groups (by count and time), each group as one
    commit with the app transaction (run_id, n) and the run's record; the old rows of the images a
    group re-processes (and, in the first commit, of pruned images) leave in that commit.
    `finish` records the run's end."""

    def __init__(self, tables: OutputTables, run_id: str, record: dict[str, Any], replacements: Replacements,
                 log: Callable[[str], None], max_shards: int = 64, max_wait_s: float = 2.0) -> None:
        self.tables, self.run_id, self.record, self.log = tables, run_id, record, log
        self.replacements = replacements
        self.max_shards, self.max_wait_s = max_shards, max_wait_s
        self.rewriter: InlinePublisher | RayPublisher | None = None  # set where files are written
        self.waiting: list[dict[str, Any]] = []
        self.since = 0.0
        self.version = 0  # commits made (the app transaction's version)
        self.counts = dict.fromkeys(COUNTS, 0)

    def add(self, results: list[dict[str, Any]]) -> None:
        if results and not self.waiting:
            self.since = time.monotonic()
        self.waiting += results
        if self.waiting and (len(self.waiting) >= self.max_shards or time.monotonic() - self.since >= self.max_wait_s):
            self.flush()

    def flush(self) -> None:
        """Commits everything waiting, in groups of at most max_shards."""
        while self.waiting:
            group, self.waiting = self.waiting[:self.max_shards], self.waiting[self.max_shards:]
            self._commit(group)
        self.since = time.monotonic()

    def _commit(self, group: list[dict[str, Any]]) -> None:
        drops = self.replacements.take([i for r in group for i in r["image_ids"]])
        swaps = self.rewriter.rewrite(drops) if drops else []
        counts = {k: self.counts[k] + (len(group) if k == "shards" else sum(r[k] for r in group)) for k in COUNTS}
        self.version += 1
        self.tables.commit_group(self.run_id, self.version, [r["file"] for r in group], swaps,
                                 {**self.record, "counts": counts})
        self.replacements.swapped(drops, swaps)
        self.counts = counts
        replaced = sum(len(ids) for ids in drops.values())
        if group:
            self.log(f"committed {len(group)} shard(s) ({sum(r['num_images'] for r in group)} images) as commit "
                     f"{self.version}; {self.counts['num_images']} images this run"
                     + (f"; {replaced} old row(s) replaced" if replaced else ""))
        else:
            self.log(f"pruned {replaced} row(s) of images no longer listed")

    def current(self, **end: Any) -> dict[str, Any]:
        return {**self.record, "counts": dict(self.counts), **end}

    def prune(self) -> None:
        """Commits the prune no group carried (a run with nothing else to commit)."""
        self.flush()
        if self.replacements.pending_prune():
            self._commit([])

    def finish(self, **end: Any) -> None:
        """Commits what waits, then the run's end record."""
        self.flush()
        self.version += 1
        self.tables.record(self.run_id, self.version, self.current(**end))


class ShardCollector:
    """The driver's bookkeeping: which images of each shard are staged, and in which fragments.

    A shard is handed to the publisher once all of its images have arrived (images that failed
    transiently are 'retry' rows like any other); an image delivered twice (a retried task) is
    taken from its first fragment only. Finished publishes go to `results`."""

    def __init__(self, shards: list[Span], listing: Listing, publisher: InlinePublisher | RayPublisher | None,
                 log: Callable[[str], None] = lambda _: None) -> None:
        self.shards: dict[str, tuple[Span, Listing | None]] = {}  # None: submitted
        self.add_shards(shards, listing)
        self.publisher, self.log = publisher, log
        self.fragments: dict[str, list[Fragment]] = {}
        self.seen: dict[str, set[str]] = {}
        self.submitted: set[str] = set()
        self.done: set[str] = set()
        self.results: list[dict[str, Any]] = []

    def add_shards(self, shards: list[Span], listing: Listing) -> None:
        """More shards (spans of `listing`: a listing part's pending images), before any of their
        rows can arrive (one dict update each: safe beside the driver's loop)."""
        for s in shards:
            self.shards[s.shard_id] = (s, listing)

    def add(self, batch: pa.Table) -> None:
        """FRAGMENT_SCHEMA rows from the workers."""
        for row in batch.to_pylist():
            sid = row["shard_id"]
            if sid in self.submitted:  # a retried task delivered images of a published shard again
                continue
            seen = self.seen.setdefault(sid, set())
            fresh = tuple(i for i in dict.fromkeys(row["image_ids"]) if i not in seen)
            if not fresh:
                continue
            seen.update(fresh)
            self.fragments.setdefault(sid, []).append(Fragment(row["path"], fresh))
            span, listing = self.shards[sid]
            if len(seen) == len(span):
                self.submitted.add(sid)
                del self.seen[sid]
                self.shards[sid] = (span, None)  # a part's listing goes once all its shards are published
                self.publisher.submit(listing.shard(span), self.fragments.pop(sid))
        self.collect()

    def collect(self, wait: bool = False) -> None:
        """Moves the finished publishes to `results`."""
        for result in self.publisher.poll(wait):
            self.done.add(result["shard_id"])
            self.results.append(result)

    def take(self) -> list[dict[str, Any]]:
        out, self.results = self.results, []
        return out

    def missing(self) -> list[str]:
        """Shards that were not published."""
        return sorted(set(self.shards) - self.done)


def run_segment(config: SegmentConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs the job (or the rest of it) and returns the summary; the run's record goes into the
    tables' commit metadata (`jobs.show OUT --history`).

    Starts a local Ray unless one is initialised (or RAY_ADDRESS points at a cluster).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    try:
        lease = Lease(config.output, config.storage_options)
    except Exception as e:
        raise SegmentError(f"--output {config.output}: cannot open it ({type(e).__name__}: {one_line(e)}); "
                           f"check the URL and --storage-options") from None
    try:
        return _run(config, log, lease, start)
    finally:
        lease.release()


def run_record(plan: Plan, config: SegmentConfig, started_at: str) -> dict[str, Any]:
    """What every commit of a run carries in its metadata (plus counts, complete and exit)."""
    return {"run_id": plan.run_id, "started_at": started_at, "input": config.input, "checkpoint": config.checkpoint,
            "checkpoint_sha256": plan.checkpoint_sha256, "settings": config.result_settings(),
            "config": config.to_dict(), "listing": plan.listing_path, "resumes": plan.resumes,
            "planned": plan.counts, "skipped_keys": plan.skipped, "counts": dict.fromkeys(COUNTS, 0), "complete": False,
            "finished_listing": False, "exit": "running", "versions": versions()}


def _run(config: SegmentConfig, log: Callable[[str], None], lease: Lease, start: float) -> dict[str, Any]:
    run_id = new_run_id()
    started_at = now_utc()
    plan = prepare(config, lease, run_id, lambda p: run_record(p, config, started_at), log, stream=True)
    classifier = Classifier(images_state(plan), plan.overwrite)  # the table as this run plans against it
    log(f"run {run_id}: planning part by part as {config.input} is listed (shards of {config.shard_size})"
        + (f"; continuing run {plan.resumes}'s listing" if plan.resumes else ""))
    replacements = Replacements({})
    committer = GroupCommitter(plan.tables, run_id, run_record(plan, config, started_at), replacements, log,
                               config.commit_shards, config.commit_every_s)
    committer.rewriter = InlinePublisher(config.output, config.storage_options, run_id)  # until Ray runs the job
    collector = ShardCollector([], Listing.empty(), None, log)
    feed = Feed(lambda: log(f"first shards handed to the actors {time.perf_counter() - start:.1f} s after the start"))
    stream = PlanStream(plan, config, classifier, replacements,
                        committer.record, lambda spans, pending: _hand_over(collector, feed, spans, pending),
                        feed.close, log).start()
    try:
        with status_lines(lambda: committer.counts["num_images"], lambda: stream.pending, log):
            run_s, res = _process(plan, config, committer, collector, stream, feed, log)
        stream.check()
    except BaseException as e:
        stream.stop()
        try:  # best effort: the run's record says how it ended (a kill leaves it "running")
            if committer.version or committer.waiting:
                committer.finish(exit=f"error: {type(e).__name__}: {one_line(e)}"[:500])
        except Exception:
            pass
        raise
    plan = stream.final_plan()
    c = plan.counts
    log(f"run {run_id}: {c['listed']} images listed in {stream.parts} part(s); {c['done']} done, {c['new']} new, "
        f"{c['changed']} changed, {c['to_retry']} to retry, {c['vanished']} vanished; {stream.pending} run in "
        f"{stream.shards} shards" + skipped_note(plan.skipped))
    committer.prune()
    state = plan.tables.images_state(["image_id", "status", "num_proposals", "run_id", "error"])
    status = state.column("status")
    # a 'retry' row whose key vanished is not retried (the plan counts it as vanished): it does not fail the run
    listed_retry = pc.and_(pc.equal(status, RETRY), pc.invert(pc.is_in(state.column("image_id"),
                                                                      pa.array(plan.vanished, pa.string()))))
    totals = {"images": state.num_rows, "images_ok": _count(status, "ok"), "images_error": _count(status, "error"),
              "images_retry": int(pc.sum(listed_retry).as_py() or 0),
              "proposals": int(pc.sum(state.column("num_proposals")).as_py() or 0)}
    error_rate = totals["images_error"] / max(1, totals["images"])
    exit_reason = "done"
    if totals["images_retry"]:
        exit_reason = f"{totals['images_retry']} image(s) left as 'retry' rows"
    elif error_rate > config.max_error_rate:
        exit_reason = f"{error_rate:.1%} error rows, over --max-error-rate {config.max_error_rate}"
    committer.finish(complete=exit_reason == "done", finished_listing=True, exit=exit_reason, totals=totals)
    wall = time.perf_counter() - start
    processed = committer.counts["num_images"]
    summary = {"output": config.output, "run_id": run_id, **totals, "shards": committer.counts["shards"],
               "images_this_run": processed, **{k: c[k] for k in ("done", "new", "changed", "to_retry", "vanished")},
               "resumed": plan.resumes, "wall_s": round(wall, 3),
               "images_per_s": round(processed / wall, 3) if wall > 0 else 0.0,
               # the Ray Data execution alone (no listing, checkpoint check or Ray start-up)
               "pipeline_s": round(run_s, 3), "pipeline_images_per_s": round(processed / run_s, 3) if run_s else 0.0,
               # from the start to the first block of rows handed to the graph (None: nothing to run)
               "first_shard_s": round(feed.first_block_at - start, 3) if feed.first_block_at else None,
               "actors": res.actors, "gpus_per_actor": res.gpus_per_actor,
               "postprocess": "actor" if res.postprocess_in_actor else "tasks", "skipped_keys": plan.skipped,
               "error_rate": round(error_rate, 4), "complete": exit_reason == "done"}
    plan.store.remove_tmp()
    if totals["images_retry"]:
        mine = state.filter(listed_retry)
        first = mine.column("error")[0].as_py()
        raise IncompleteRunError(f"{totals['images_retry']} image(s) failed with transient errors (e.g. {first}); "
                                 f"they are committed as 'retry' rows, the rest is committed; re-run the same "
                                 f"command to retry them")
    return summary


def _hand_over(collector: ShardCollector, feed: Feed, spans: list[Span], pending: Listing) -> None:
    """A planned part's shards: the collector learns them before the graph can deliver any of their rows."""
    collector.add_shards(spans, pending)
    feed.put(pending_rows(pending, spans))


def _count(column: pa.ChunkedArray, value: str) -> int:
    return int(pc.sum(pc.equal(column, value)).as_py() or 0)


def _process(plan: Plan, config: SegmentConfig, committer: GroupCommitter, collector: ShardCollector,
             stream: PlanStream, feed: Feed, log: Callable[[str], None]) -> tuple[float, Resources]:
    """Runs the Ray Data graph over the shards as they are planned, committing as shards finish.
    Ray starts while the listing goes on; a run whose listing ended with nothing to do starts none
    (one-part inputs: local folders, manifests, inventories)."""
    from .ray_init import init_ray

    if plan.listing_ongoing:  # Ray starts beside the listing
        init_ray(log)
    stream.wait_for_work()
    if not stream.shards:
        return 0.0, Resources(0, 0.0, 0.0, False, 0)  # nothing to run: no actors
    import ray

    init_ray(log)  # (a no-op where it started above)
    cluster = ray.cluster_resources()
    node_cpus = [c for n in ray.nodes() if n.get("Alive") and (c := n["Resources"].get("CPU", 0.0)) > 0]
    res = resolve_resources(config, cluster, node_cpus)
    committer.record["resources"] = resources_record(res, cluster, node_cpus)
    log(f"inference: {res.actors} actor(s), {res.gpus_per_actor} GPU each, batch size {res.batch_size}, "
        f"{config.inference.nms} NMS in the actors; RLE strings in "
        f"{'the actors' if res.postprocess_in_actor else 'CPU tasks'}")
    if res.actors * res.gpus_per_actor > cluster.get("GPU", 0):
        log(f"warning: {res.actors} actors x {res.gpus_per_actor} GPU need more than the cluster has now "
            f"({cluster.get('GPU', 0)} GPU, {cluster.get('CPU', 0)} CPU); they wait for an autoscaler")
    publisher = RayPublisher(config.output, config.storage_options, plan.run_id)
    committer.rewriter = publisher  # old files are rewritten off the driver too
    collector.publisher = publisher
    run_start = time.perf_counter()
    # blocks sized by what is planned so far (the whole plan of a one-part input, as before)
    read_rows = min(read_block_rows(stream.pending, res.actors), READ_BLOCK_MAX)  # a block in one call
    inputs = feed.start(read_rows)
    try:
        with spread_actors(res, node_cpus, log) as placement, CommitTicker(collector, committer) as ticker:
            # prefetch 0: a batch is handed over as it comes (with prefetching, the last one waits for
            # the next: a shard of a part whose successor is still being listed would wait with it)
            for batch in build_dataset(inputs, plan, config, res, placement).iter_batches(
                    batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                ticker.step(batch)
    except BaseException:
        feed.stop()
        raise
    stream.check()  # the graph ended because the feed closed: the listing ended (or failed)
    if feed.error is not None:
        raise feed.error
    collector.collect(wait=True)
    committer.add(collector.take())
    committer.flush()
    if collector.missing():
        raise IncompleteRunError(f"shards {collector.missing()[:10]} did not receive all their images; "
                                 f"re-run the same command to finish them")
    return time.perf_counter() - run_start, res


def resources_record(res: Resources, cluster: dict[str, float], node_cpus: list[float]) -> dict[str, Any]:
    """What the run's record says about where it ran (the report's 'Runs' table)."""
    return {"actors": res.actors, "gpus_per_actor": res.gpus_per_actor, "cpus_per_actor": res.cpus_per_actor,
            "batch_size": res.batch_size, "postprocess": "actor" if res.postprocess_in_actor else "tasks",
            "nodes": len(node_cpus), "cluster_cpus": cluster.get("CPU", 0.0), "cluster_gpus": cluster.get("GPU", 0.0)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, dist in (("ifcn", "instancefcn"), ("torch", "torch"), ("ray", "ray"), ("pyarrow", "pyarrow"),
                       ("deltalake", "deltalake")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out
