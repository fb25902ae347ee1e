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
from pipeline.tables.delta import OLD_LAYOUT_MARKERS, STATE_COLUMNS, OutputTables
from pipeline.tables.files import FILE_COLUMN, StateRanges, TableDamagedError

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

    Parts come in key order (disjoint ranges of image ids), so part k is compared only with the
    table's rows whose ids lie after part k-1's last id and up to its own last id (`state.rows`:
    read from the table's files for that range, pinned at the run's start: `StateRanges`), and
    those rows it does not list are vanished there and then. The driver holds one range's rows at a
    time plus the vanished ones, never the whole table; rows after the last part are read once the
    listing has ended (`vanished`). Columnar and join-free: `index_in` over the range's rows.

    state: a table of the state's columns (any order; held in memory) or a `StateRanges`."""

    def __init__(self, state: pa.Table | StateRanges, overwrite: bool = False) -> None:
        if overwrite:  # the rows there now are to be replaced, so every listed image is new
            state = StateRanges(None, STATE_COLUMNS)
        elif isinstance(state, pa.Table):
            state = _TableRanges(state)
        self.state = state
        self.last: str | None = None  # the last image id of the parts so far
        self.gone: list[pa.Table] = []  # (image_id, FILE_COLUMN) of table rows no part listed
        self.ended: pa.Table | None = None  # all of `gone`, once `vanished` has read the rest

    def part(self, listing: Listing) -> PartPlan:
        ids = listing.image_ids
        if not len(ids):
            return PartPlan(listing, dict.fromkeys(("listed", "done", "new", "changed", "to_retry"), 0), [], [], {})
        lo, hi = (v.as_py() for v in pc.min_max(ids).values())
        if self.last is not None and lo <= self.last:
            raise ValueError(f"listing parts out of key order: {lo!r} comes after {self.last!r}")
        state = self.state.rows(self.last, hi)  # sorted: last < image_id <= hi
        self.last = hi
        pos = pc.index_in(ids, value_set=state.column("image_id")).cast(pa.int64())  # (listed,) null: not in it
        status = state.column("status").take(pos)
        same = pc.and_(pc.equal(pc.fill_null(listing.etags, ""), pc.fill_null(state.column("etag").take(pos), "")),
                       pc.equal(pc.fill_null(listing.sizes, -1), pc.fill_null(state.column("size").take(pos), -1)))
        new = pc.is_null(pos)
        retry = pc.fill_null(pc.equal(status, RETRY), False)
        final = pc.fill_null(pc.is_in(status, pa.array(FINAL)), False)
        changed = pc.and_(final, pc.invert(same))
        todo = pc.or_(pc.or_(new, retry), changed)
        pending = listing if pc.all(todo).as_py() else listing.take(pc.indices_nonzero(todo))
        listed = np.zeros(state.num_rows, bool)  # (range rows,): the row's image is in this part
        listed[pos.drop_null().to_numpy()] = True
        if not listed.all():
            self.gone.append(state.select(["image_id", FILE_COLUMN]).filter(pa.array(~listed)))
        replaced = pc.or_(changed, retry)
        ids_of = lambda mask: ids.filter(mask)  # noqa: E731
        counts = {"listed": len(listing), "done": int(pc.sum(pc.and_(final, same)).as_py() or 0),
                  "new": int(pc.sum(new).as_py() or 0), "changed": int(pc.sum(changed).as_py() or 0),
                  "to_retry": int(pc.sum(retry).as_py() or 0)}
        files = state.column(FILE_COLUMN).take(pos.filter(replaced))
        return PartPlan(pending, counts, ids_of(changed).to_pylist(), ids_of(retry).to_pylist(),
                        dict(zip(ids_of(replaced).to_pylist(), files.to_pylist())))

    def vanished(self) -> pa.Array:
        """Ids of the table's rows no part listed (call once the listing has ended: it reads the
        rows after the last part)."""
        if self.ended is None:
            tail = self.state.rows(self.last, None).select(["image_id", FILE_COLUMN])
            self.ended = pa.concat_tables([*self.gone, tail]).combine_chunks()
            self.gone = []
        return self.ended.column("image_id").combine_chunks()

    def holders(self, image_ids: pa.Array) -> dict[str, str]:
        """image id -> data file of its row, for vanished rows `image_ids` (pruned images)."""
        self.vanished()
        keep = pc.is_in(self.ended.column("image_id"), value_set=image_ids)
        rows = self.ended.filter(keep)
        return dict(zip(rows.column("image_id").to_pylist(), rows.column(FILE_COLUMN).to_pylist()))


class _TableRanges:
    """A state table held in memory, read by range as `StateRanges` is (sorted by id once; each
    range a zero-copy slice found by two binary searches)."""

    def __init__(self, state: pa.Table) -> None:
        ids = state.column("image_id")
        if len(ids) > 1 and not pc.all(pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py():
            state = state.take(pc.sort_indices(ids))  # a table holds each id once: sorted means strictly
        self.state = state.combine_chunks()
        self.ids = _Sorted(self.state.column("image_id").chunk(0) if self.state.num_rows
                           else pa.array([], pa.string()))

    def rows(self, after: str | None, until: str | None) -> pa.Table:
        lo = 0 if after is None else bisect.bisect_right(self.ids, after)
        hi = len(self.ids) if until is None else bisect.bisect_right(self.ids, until, lo)
        return self.state.slice(lo, hi - lo)


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


def images_state(plan: Plan) -> StateRanges:
    """The images table's planning state as the run plans against it (read by key range)."""
    try:
        return plan.tables.state_ranges()
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
