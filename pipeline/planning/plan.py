"""Planning a run: which images it processes, decided from the input listing and the images table.

    pending = listing - images rows with status ok/error for the same object version (etag, size)

so a re-run over a bucket that grew processes only the new keys; a key whose object changed is
re-processed and its old rows replaced; images committed as 'retry' rows are redone; keys that
vanished from the bucket keep their rows unless --prune deletes them. A run snapshots its listing,
part by part, into `_runs/<run_id>/listing/` (pipeline/planning/parts.py) before any of a part's shards can
commit; a run that was interrupted before it went through its listing is continued by the next one
from those parts (listing only the keys after them), whatever the bucket did meanwhile.

Replacing rows is never a separate step: the plan records which data file holds the old row of
each image it re-processes (and, with --prune, of each vanished one); the commit that adds an
image's new row also swaps that file for a rewrite without the old row (pipeline/tables/delta.py).

Settings that define the results (checkpoint digest, inference settings, decode limits) are the
table's description; a run with different ones is refused with one line.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifcn.config import ModelConfig
from ifcn.image import one_line
from ifcn.models.checkpoint_header import checkpoint_header

from pipeline.config import SegmentConfig, SegmentError
from pipeline.errors import RETRY
from pipeline.tables.lease import Lease
from pipeline.tables.schema import FORMAT

from .parts import PARTS_DIR, listing_parts, read_parts, write_part
from pipeline.tables.store import OutputStore, new_run_id, now_utc  # noqa: F401  (run.py imports the run-id helpers from here)
from pipeline.tables.delta import OLD_LAYOUT_MARKERS, OutputTables
from pipeline.tables.files import FILE_COLUMN, TableDamagedError

from .sources import Listing, Span

RUNS_DIR = "_runs"
FINAL = ("ok", "error")  # statuses a re-run does not redo (unless the object changed)


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before any work starts."""

    run_id: str
    listing: Listing  # the whole input listing of this run (empty while a streamed run lists)
    listing_path: str  # the snapshot's folder of parts (pipeline/planning/parts.py), relative to the output
    resumes: str | None  # the interrupted run whose snapshot this run continues
    skipped: dict[str, int]  # prefix keys that are not images, by extension
    pending: Listing  # images to process, in listing order
    shards: list[Span]  # spans of `pending`
    counts: dict[str, int]  # done, new, changed, to_retry, vanished
    changed: list[str]  # image ids re-processed because their object changed (rows replaced)
    retry: list[str]  # image ids of 'retry' rows (redone)
    vanished: list[str]  # image ids with rows whose key is no longer listed (kept unless --prune)
    holders: dict[str, str]  # image id -> data file holding the row this run replaces (changed, retry, pruned)
    store: OutputStore
    tables: OutputTables
    settings: dict[str, Any]  # what defines the results (stored with the tables)
    checkpoint_sha256: str
    model_config: dict[str, Any]
    overwrite: bool = False  # the output's rows (other settings) are replaced by this run's
    parts: Any = ()  # the listing's ListingParts (a list; with make_plan(stream=True), an iterator still listing)
    listing_ongoing: bool = False  # make_plan(stream=True): its first part did not end the listing


def result_fingerprint(config: SegmentConfig, sha: str) -> dict[str, Any]:
    """The settings an output's rows were made with, as they read back (tuples become lists)."""
    return json.loads(json.dumps({"format": FORMAT, "checkpoint_sha256": sha, "settings": config.result_settings()}))


def make_plan(config: SegmentConfig, run_id: str = "dry-run", guard: Callable[[], None] | None = None,
              stream: bool = False) -> Plan:
    """Checkpoint, input listing (after an interrupted run's snapshotted parts), output state:
    read only (what --dry-run prints). With `stream`, only the listing's first part is awaited
    (a listing error still comes before anything is written) and `plan.parts` yields the rest
    while it is listed: the run plans part by part (pipeline/planning/stream.py). Raises SegmentError (one line)."""
    so = config.storage_options
    try:
        sha, header = checkpoint_header(config.checkpoint, so)  # one read, no torch, no model built
        model_config = ModelConfig.from_dict(header["config"]).to_dict()
    except Exception as e:
        raise SegmentError(f"--checkpoint {config.checkpoint}: cannot load it ({type(e).__name__}: {one_line(e)}); "
                           f"pass a file written by ifcn.save_checkpoint or jobs.train") from None
    settings = result_fingerprint(config, sha)
    try:
        store = OutputStore(config.output, so)
        tables = OutputTables(config.output, so, guard)
        previous = tables.settings()
        last = tables.last_run()
        old_layout = [] if previous is not None else [m for m in OLD_LAYOUT_MARKERS if store.fs.exists(store.path(m))]
    except Exception as e:
        raise SegmentError(f"--output {config.output}: cannot read it ({type(e).__name__}: {one_line(e)}); "
                           f"check the URL, credentials and --storage-options") from None
    if old_layout:
        raise SegmentError(f"--output {config.output} holds results of an older layout ({', '.join(old_layout)}); "
                           f"use a new --output, or delete it to start over")
    overwrite = False
    if previous is not None:
        diffs = job_differences(previous, settings)
        if diffs and not tables.file_sizes():  # a run killed before its first rows: nothing to replace
            diffs, overwrite = [], True
        if diffs and not config.overwrite:
            raise SegmentError(f"--output {config.output} holds results of different settings ({'; '.join(diffs)}); "
                               f"use a new --output, or --overwrite to replace them (the old rows stay readable "
                               f"by table version)")
        overwrite = overwrite or bool(diffs)
    skipped: dict[str, int] = {}
    resumed, resumes, folder = [], None, f"{RUNS_DIR}/{run_id}/{PARTS_DIR}"
    if last is not None and not last.get("finished_listing") and last.get("listing") \
            and last.get("input") == config.input and not overwrite:
        resumed = read_parts(store, last["listing"])
        if resumed:  # parts of its listing were snapshotted: continue it (and write the rest beside them)
            resumes, folder = last["run_id"], last["listing"]
    parts = listing_parts(config.input, so, skipped, resumed, config.listing_part)
    plan = Plan(run_id, Listing.empty(), folder, resumes, skipped, Listing.empty(), [], {}, [], [], [], {}, store,
                tables, settings, sha, model_config, overwrite)
    if stream:
        first = next(parts)
        return dataclasses.replace(plan, parts=itertools.chain([first], parts), listing_ongoing=not first.last)
    parts = list(parts)
    return _classified(dataclasses.replace(plan, listing=Listing.concat([p.listing for p in parts]), parts=parts,
                                           skipped=dict(sorted(skipped.items()))), config)


class Classifier:
    """The images table's state at the start of a run, and listing parts classified against it.

    Columnar and join-free: the state is sorted by image id once; a part (sorted, a key range) is
    looked up only in the state rows of its own key range (two binary searches, then `index_in`
    over that slice: a hash table of the part's size, not of the whole table, so 100 parts of a
    10M-row table cost one pass, not 100). The driver holds the state and a few flat arrays per
    part (one int32 and some booleans per listed image), never a joined copy. Which table rows
    were listed at all is kept as one boolean per row, for `vanished` once the listing has ended."""

    def __init__(self, state: pa.Table, overwrite: bool = False) -> None:
        if overwrite:  # the rows there now are to be replaced, so every listed image is new
            state = state.slice(0, 0)
        ids = state.column("image_id")
        if len(ids) > 1 and not pc.all(pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py():
            state = state.take(pc.sort_indices(ids))  # a table holds each id once: sorted means strictly
        self.ids = state.column("image_id").combine_chunks()
        self.status = state.column("status").combine_chunks()
        self.etags = state.column("etag").combine_chunks()
        self.sizes = state.column("size").combine_chunks()
        self.files = state.column(FILE_COLUMN).combine_chunks()
        self.listed = np.zeros(len(self.ids), bool)  # (rows,): the row's image was in a part

    def part(self, listing: Listing) -> PartPlan:
        pos = self._positions(listing.image_ids)  # (listed,) int64 rows of the table, null: not in it
        status = self.status.take(pos)
        same = pc.and_(pc.equal(pc.fill_null(listing.etags, ""), pc.fill_null(self.etags.take(pos), "")),
                       pc.equal(pc.fill_null(listing.sizes, -1), pc.fill_null(self.sizes.take(pos), -1)))
        new = pc.is_null(pos)
        retry = pc.fill_null(pc.equal(status, RETRY), False)
        final = pc.fill_null(pc.is_in(status, pa.array(FINAL)), False)
        changed = pc.and_(final, pc.invert(same))
        todo = pc.or_(pc.or_(new, retry), changed)
        pending = listing if pc.all(todo).as_py() else listing.take(pc.indices_nonzero(todo))
        self.listed[pos.drop_null().to_numpy()] = True
        replaced = pc.or_(changed, retry)
        ids = lambda mask: listing.image_ids.filter(mask)  # noqa: E731
        counts = {"listed": len(listing), "done": int(pc.sum(pc.and_(final, same)).as_py() or 0),
                  "new": int(pc.sum(new).as_py() or 0), "changed": int(pc.sum(changed).as_py() or 0),
                  "to_retry": int(pc.sum(retry).as_py() or 0)}
        return PartPlan(pending, counts, ids(changed).to_pylist(), ids(retry).to_pylist(),
                        dict(zip(ids(replaced).to_pylist(), self.files.take(pos.filter(replaced)).to_pylist())))

    def _positions(self, ids: pa.Array) -> pa.Array:
        """Rows of the (sorted) table holding the sorted `ids`, null where none does."""
        if not len(ids) or not len(self.ids):
            return pa.nulls(len(ids), pa.int64())
        if len(ids) > 1 and not pc.all(pc.less_equal(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py():
            return pc.index_in(ids, value_set=self.ids).cast(pa.int64())  # not a key range: the whole table
        lo = bisect.bisect_left(_Sorted(self.ids), ids[0].as_py())
        hi = bisect.bisect_right(_Sorted(self.ids), ids[-1].as_py(), lo)
        found = pc.index_in(ids, value_set=self.ids.slice(lo, hi - lo))
        return pc.add(found.cast(pa.int64()), lo)

    def vanished(self) -> pa.Array:
        """Ids of the table's rows no part listed (call once the listing has ended)."""
        return self.ids.filter(pa.array(~self.listed))

    def holders(self, image_ids: pa.Array) -> dict[str, str]:
        """image id -> data file of its row, for table rows `image_ids` (pruned images)."""
        keep = pc.is_in(self.ids, value_set=image_ids)
        return dict(zip(self.ids.filter(keep).to_pylist(), self.files.filter(keep).to_pylist()))


class _Sorted:
    """A sorted Arrow string array as `bisect` reads it (one scalar per probe: ~24 for 10M rows)."""

    def __init__(self, values: pa.Array) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> str:
        return self.values[i].as_py()


@dataclass(frozen=True)
class PartPlan:
    """One listing part classified: its images to process and what the run's plan counts of it."""

    pending: Listing  # in listing order
    counts: dict[str, int]  # listed, done, new, changed, to_retry
    changed: list[str]
    retry: list[str]
    holders: dict[str, str]  # image id -> data file of the row it replaces (changed and retry)


def images_state(plan: Plan) -> pa.Table:
    try:
        return plan.tables.images_state(with_files=True)
    except TableDamagedError as e:
        raise SegmentError(str(e)) from None


def _classified(plan: Plan, config: SegmentConfig) -> Plan:
    """`plan` with pending images, shards and counts from the images table as it is now (the
    whole listing as one part)."""
    classifier = Classifier(images_state(plan), plan.overwrite)
    part = classifier.part(plan.listing)
    vanished = classifier.vanished()
    holders = {**part.holders, **(classifier.holders(vanished) if config.prune else {})}
    return dataclasses.replace(plan, pending=part.pending, shards=part.pending.spans(config.shard_size),
                               counts={**part.counts, "vanished": len(vanished)}, changed=part.changed,
                               retry=part.retry, vanished=vanished.to_pylist(), holders=holders)


def prepare(config: SegmentConfig, lease: Lease | None = None, run_id: str | None = None,
            record: Callable[[Plan], dict[str, Any]] | None = None, log: Callable[[str], None] = lambda _: None,
            stream: bool = False) -> Plan:
    """Takes `lease` (if given), then preflight (`make_plan`; every commit checks the lease), takes
    the table's next fencing generation in one commit (creating the table, or with other settings
    and --overwrite replacing it by an empty version), re-reads the table and snapshots the
    listing's parts. Nothing else is written: old rows leave in the commits that replace them.
    `record(plan)` is the run's record for the commits this makes. With `stream`, the listing goes
    on in `plan.parts` and pipeline/planning/stream.py snapshots and classifies each part as it comes."""
    if lease is not None:  # before listing and hashing: a second run is refused at once, whatever the input
        lease.acquire()
        if lease.took_over:
            log(f"took over the lease of a stale run ({lease.took_over})")
    plan = make_plan(config, run_id or new_run_id(), lease.check if lease is not None else None, stream)
    record = record or (lambda p: {"run_id": p.run_id, "started_at": now_utc(), "exit": "running"})
    try:
        plan.tables.fence(record(plan), plan.settings, overwrite=plan.overwrite)
        if plan.overwrite and config.overwrite:
            log("replaced the output's rows (other settings) with an empty table version; the old rows stay "
                "readable by version")
        if not stream:
            plan = _classified(plan, config)  # another run may have committed before we held the lease
            for part in plan.parts:
                if not part.snapshotted:
                    write_part(plan.store, plan.listing_path, part)
        plan.store.remove_tmp()  # fragments of a killed run
    except SegmentError:
        raise
    except Exception as e:
        raise SegmentError(f"--output {config.output}: cannot write to it ({type(e).__name__}: {one_line(e)}); "
                           f"check permissions, credentials and --storage-options") from None
    return plan


def describe_plan(plan: Plan, config: SegmentConfig) -> str:
    """What --dry-run prints: the plan in a few lines; nothing has been written or started."""
    c = plan.counts
    source = f"continuing run {plan.resumes}'s listing snapshot" if plan.resumes else f"input {config.input}"
    lines = [f"{source}: {len(plan.listing)} images" + skipped_note(plan.skipped),
             f"output {config.output}: {c['done']} done, {c['new']} new, {c['changed']} changed, "
             f"{c['vanished']} vanished{' (pruned)' if config.prune else ''}, {c['to_retry']} to retry; {len(plan.shards)} shards of {config.shard_size} "
             f"to run ({len(plan.pending)} images)",
             f"checkpoint {config.checkpoint}: sha256 {plan.checkpoint_sha256[:12]}..., "
             f"backbone {plan.model_config.get('backbone')}",
             f"inference: {json.dumps(config.inference.to_dict(), sort_keys=True)}",
             *(["--overwrite: the output's rows (other settings) would be replaced in a new table version"]
               if plan.overwrite and config.overwrite else []),
             "dry run: nothing written, no workers started"]
    return "\n".join(lines)


def skipped_note(skipped: dict[str, int]) -> str:
    if not skipped:
        return ""
    parts = ", ".join(f"{n} {ext or '(no extension)'}" for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return f"; skipped keys that are not images: {parts}"


def job_differences(previous: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """Human-readable differences between an output's settings and this run's."""
    diffs = []
    if previous.get("format") != job["format"]:
        diffs.append(f"format: {previous.get('format')} before, {job['format']} now")
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
