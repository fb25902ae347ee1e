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
import platform
import sys
import time
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from ifcn.image import one_line

from pipeline.planning.plan import Classifier, Plan, images_state, new_run_id, now_utc, prepare, skipped_note
from pipeline.planning.sources import Listing, Span
from pipeline.planning.stream import PlanStream
from pipeline.stages.feed import Feed
from pipeline.tables.delta import Replacements
from pipeline.tables.lease import Lease

from .commit import (COUNTS, CommitTicker, GroupCommitter, InlinePublisher, RayPublisher, ShardCollector,
                     pending_rows)
from .config import IncompleteRunError, SegmentConfig, SegmentError
from .errors import RETRY
from .graph import (READ_BLOCK_MAX, Resources, build_dataset, read_block_rows, resolve_resources, resources_record,
                    spread_actors)
from .progress import status_lines

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
                        feed.close, log, lambda: feed.wait_for_room(config.listing_part)).start()
    try:
        with status_lines(lambda: committer.counts["num_images"], lambda: stream.pending, log):
            run_s, res = _process(plan, config, committer, collector, stream, feed, log)
        stream.check()
    except BaseException as e:
        stream.stop()
        feed.stop()  # (the planner may wait for the feed's room)
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
    if not plan.listing_ongoing:  # one part (listed in one call): planned in milliseconds
        stream.ended.wait()
    read_rows = min(read_block_rows(stream.pending, res.actors), READ_BLOCK_MAX)  # a block in one call
    # the whole plan known and at most a part's images: plain Arrow blocks (all in the object store at
    # once); else the feed's queue, drained as the actors go (a 10M-image manifest is one part)
    whole = stream.ended.is_set() and stream.pending <= config.listing_part
    inputs = feed.static(read_rows) if whole else feed.start(read_rows)
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


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, dist in (("ifcn", "instancefcn"), ("torch", "torch"), ("ray", "ray"), ("pyarrow", "pyarrow"),
                       ("deltalake", "deltalake")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out
