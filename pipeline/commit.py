"""How finished work reaches the table, on the driver: shards collected from the fragments the
stages hand over, published in Ray tasks (or inline in tests), and committed in groups, also while
no batch arrives (CommitTicker). Every commit is one fenced Delta commit (pipeline/tables/delta.py).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ifcn.image import one_line

from pipeline.planning.sources import Listing, Shard, Span
from pipeline.stages.sink import Fragment, publish_shard, rewrite_file
from pipeline.tables.delta import OutputTables, Replacements

from .config import IncompleteRunError

PUBLISH_CPUS = 0.5  # a publish task waits on storage and encodes Parquet (~1 ms per image); 0.25 let 4 run per free
# core, and every concurrent task is a worker process Ray starts (~0.5-1 CPU-s each: bench/cpu_side.py)
PUBLISH_RETRIES = 3  # a publish task whose worker dies or whose storage call fails runs again


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
