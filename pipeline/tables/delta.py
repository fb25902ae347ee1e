"""The output table: one Delta Lake table, `OUT/segments`, one row per image with its proposals
nested (pipeline/tables/schema.py says why one table), and how it is committed.

Who does what (no mask bytes pass through the driver):
    workers (publish tasks) write each shard's rows as one Parquet file straight into the table
        folder (`write_data_file`) and return its add-action facts (path, size, stats); workers
        also rewrite an old data file without the rows of images being replaced (`rewrite`);
    the driver commits: each group of finished shards is ONE Delta commit that adds their files
    and swaps every old file holding a replaced image for its rewrite (remove + add).

Exactly once, for every reader and after any kill, holds because every change is one commit:
    - a group commit carries the app transaction (run_id, group number): a re-sent commit after
      an ambiguous storage error is found and not repeated;
    - an image re-processed (its object changed, or it was a 'retry' row) leaves its old row in
      the same commit that adds its new one; pruned images leave in one commit;
    - `--overwrite` is one commit (a new, empty table version; old versions stay readable);
    - a kill between commits leaves the table as the last commit made it: the next run plans
      from it and redoes exactly what is missing. There is nothing to roll forward.
Fencing: every commit of a run carries the app transaction (LEASE_APP, generation), the run's
generation is one more than the table's when it took the lease (`fence`), and commits are made
with no automatic retry. A run that lost its lease (paused past the TTL, taken over) cannot
commit, even if it paused after its last lease check: it either reads the newer generation
(LeaseLostError) or its commit conflicts with the new holder's (Delta's own version
compare-and-swap, and its app-transaction conflict check).
A data file that no commit adds (a task killed mid-write, a publish retried) is invisible to
every Delta reader and is removed by `vacuum`.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable

import pyarrow as pa

from pipeline.config import SegmentError
from pipeline.errors import STORAGE_ATTEMPTS, STORAGE_BACKOFF_S

from .files import FILE_COLUMN, TABLE, StateRanges, delta_storage_options, read_verified, table_dataset, table_uri
from .hooks import KILL_ENV, kill_point  # noqa: F401  (KILL_ENV: tests import it from here)
from .schema import IMAGES_SCHEMA, SEGMENTS_SCHEMA

OLD_LAYOUT_MARKERS = ("masks/_delta_log", "images/_delta_log", "_job.json", "_SUCCESS", "_commits", "_manifest.json")
RUN_KEY = "ifcn.run"  # commit metadata: the run's record (run id, settings, counts, complete, exit)
LEASE_APP = "ifcn.lease"  # app transaction whose version is the generation of the run that may commit
CHECKPOINT_EVERY = 100  # versions between Delta checkpoints: opening the table reads one Parquet + a few JSON
STATE_COLUMNS = ("image_id", "status", "etag", "size")  # what planning compares a listing with


class LeaseLostError(SegmentError):
    """This run's fencing generation is not the table's: another run holds the output now."""


class OutputTables:
    """The output's Delta table, opened lazily and kept up to date by this driver.

    (The name is kept from the two-table layout; there is one table, `segments`.)"""

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None,
                 guard: Callable[[], None] | None = None, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        """guard: called before every commit; raises to stop writing (the run's `Lease.check`)."""
        self.output, self.checkpoint_every = output, checkpoint_every
        self.options = delta_storage_options(output, storage_options)
        self.guard = guard or (lambda: None)
        self.generation: int | None = None  # this run's fencing generation (`fence`)
        self.before_commit: Callable[[], None] = lambda: None  # tests: a pause after the last checks
        self._dt: Any = None

    def uri(self, name: str = TABLE) -> str:
        return table_uri(self.output, name)

    def open(self, version: int | None = None):
        """The DeltaTable, or None when it does not exist yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if version is None and self._dt is not None:
            return self._dt
        try:
            dt = DeltaTable(self.uri(), version=version, storage_options=self.options or None)
        except TableNotFoundError:
            return None
        if version is None:
            self._dt = dt
        return dt

    def refresh(self) -> None:
        """Forget the opened table: the next read sees commits made since."""
        self._dt = None

    def settings(self) -> dict[str, Any] | None:
        """The settings the output's results were made with (the table's description)."""
        dt = self.open()
        if dt is None:
            return None
        try:
            return json.loads(dt.metadata().description or "{}")
        except json.JSONDecodeError:
            return {}

    def images_state(self, cols: list[str] | None = None, with_files: bool = False) -> pa.Table:
        """`cols` (default image_id, status, etag, size: what planning compares a listing with) of
        every image row, verified against the log (sizes, row counts, id ranges); `with_files`
        adds FILE_COLUMN (the data file, relative to the table, that holds each row)."""
        dt = self.open()
        cols = list(cols or STATE_COLUMNS)
        if dt is None:
            empty = IMAGES_SCHEMA.empty_table().select(cols)
            return empty.append_column(FILE_COLUMN, pa.array([], pa.string())) if with_files else empty
        dt.update_incremental()
        # FILE_COLUMN is the path as the dataset was given it: relative to the table, as in the log
        table = read_verified(dt, table_dataset(dt, "images", self.options), [*cols, FILE_COLUMN])
        return table if with_files else table.select(cols)

    def state_ranges(self) -> StateRanges:
        """The planning columns (STATE_COLUMNS, FILE_COLUMN) of the table as it is now, pinned at this
        version and read one image-id range at a time (`StateRanges.rows`)."""
        dt = self.open()
        if dt is None:
            return StateRanges(None, STATE_COLUMNS)
        dt.update_incremental()
        return StateRanges(self.open(version=dt.version()), STATE_COLUMNS, self.options)

    def file_sizes(self) -> dict[str, int]:
        """path -> logged size of every active data file."""
        dt = self.open()
        if dt is None:
            return {}
        adds = pa.table(dt.get_add_actions(flatten=True))
        return dict(zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist()))

    def last_run(self) -> dict[str, Any] | None:
        """The newest run record in the table's history (None: no run committed anything)."""
        dt = self.open()
        for commit in dt.history(20) if dt is not None else ():
            if RUN_KEY in commit:
                return commit[RUN_KEY]
        return None

    def runs(self) -> list[dict[str, Any]]:
        """Every run's latest record, oldest run first (reads the whole history: jobs.show --history)."""
        seen: dict[str, dict[str, Any]] = {}
        dt = self.open()
        for commit in dt.history() if dt is not None else ():  # newest first
            record = commit.get(RUN_KEY)
            if record and record["run_id"] not in seen:
                seen[record["run_id"]] = {**record, "table_version": commit.get("version"),
                                          "timestamp": commit.get("timestamp")}
        return sorted(seen.values(), key=lambda r: r.get("started_at", ""))

    # --- commits --------------------------------------------------------------------------
    def fence(self, record: dict[str, Any], settings: dict[str, Any], overwrite: bool = False) -> int:
        """Takes the next fencing generation in one commit, right after the run took its lease:
        creates the table (no rows, `settings` as its description) when there is none, or, with
        `overwrite`, replaces it with a new, empty version of `settings` (older versions stay
        readable). Every later commit of this run carries this generation; a run that took the
        output before this one can no longer commit. Returns the generation."""
        from deltalake import Schema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties, Transaction, create_table_with_add_actions

        step = "overwrite" if overwrite else "fence"
        for attempt in range(STORAGE_ATTEMPTS):
            self.guard()
            self.refresh()
            dt = self.open()
            generation = (dt.transaction_version(LEASE_APP) or 0) + 1 if dt is not None else 1
            props = CommitProperties(custom_metadata={RUN_KEY: record}, max_commit_retries=0,
                                     app_transactions=[Transaction(LEASE_APP, generation)])
            kill_point(f"before_{step}")
            try:
                if dt is None or overwrite:
                    create_table_with_add_actions(self.uri(), Schema.from_arrow(SEGMENTS_SCHEMA), [],
                                                  mode="overwrite" if dt is not None else "error",
                                                  description=json.dumps(settings, sort_keys=True),
                                                  storage_options=self.options or None, commit_properties=props)
                else:
                    dt.create_write_transaction([], "append", dt.schema(), commit_properties=props)
            except CommitFailedError:  # another run committed first: read again, it may hold the lease now
                continue
            except Exception:
                if attempt == STORAGE_ATTEMPTS - 1:
                    raise
                time.sleep(STORAGE_BACKOFF_S * 2**attempt)
                continue
            kill_point(f"after_{step}")
            self.refresh()
            dt = self.open()
            if dt is None or dt.transaction_version(LEASE_APP) != generation:
                continue  # the answer was lost and someone else won: take the next one
            self.generation = generation
            return generation
        raise SegmentError(f"--output {self.output}: could not take a fencing generation on its table "
                           f"after {STORAGE_ATTEMPTS} attempts; re-run the same command")

    def _commit(self, actions: list[Any], app_id: str, version: int, metadata: dict[str, Any],
                step: str) -> bool:
        """One commit of `actions` with app transaction (app_id, version) and this run's fencing
        generation; False when the table already has it (a re-sent commit).

        Storage failures are retried with backoff (STORAGE_ATTEMPTS, ~30 s): an attempt whose
        commit landed although its answer was lost is found by the app transaction and not
        repeated. A lost lease is never retried (LeaseLostError)."""
        from deltalake.exceptions import CommitFailedError

        if self.generation is None:
            raise AssertionError("commit before fence(): the run holds no fencing generation")
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return self._commit_once(actions, app_id, version, metadata, step)
            except LeaseLostError:
                raise
            except CommitFailedError:  # a commit landed under us: only a run that took the lease commits
                self.refresh()
                self._fenced(self.open())
                if attempt == STORAGE_ATTEMPTS - 1:
                    raise
            except Exception:
                if attempt == STORAGE_ATTEMPTS - 1:
                    raise
                self.refresh()  # re-read the log: the table may have moved on
                time.sleep(STORAGE_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _fenced(self, dt: Any) -> None:
        held = dt.transaction_version(LEASE_APP) if dt is not None else None
        if held != self.generation:
            raise LeaseLostError(f"--output {self.output}: another run took this output over (fencing generation "
                                 f"{held}, this run's {self.generation}); this run stops without committing more")

    def _commit_once(self, actions: list[Any], app_id: str, version: int, metadata: dict[str, Any],
                     step: str) -> bool:
        from deltalake.transaction import CommitProperties, Transaction

        self.guard()
        dt = self.open()
        dt.update_incremental()
        self._fenced(dt)
        done = dt.transaction_version(app_id)
        if done is not None and done >= version:
            return False
        props = CommitProperties(custom_metadata=metadata, max_commit_retries=0,
                                 app_transactions=[Transaction(app_id, version),
                                                   Transaction(LEASE_APP, self.generation)])
        self.before_commit()
        kill_point(f"before_{step}")
        dt.create_write_transaction(actions, "append", dt.schema(), commit_properties=props)
        kill_point(f"after_{step}")
        dt.update_incremental()
        if dt.version() % self.checkpoint_every == 0:
            dt.create_checkpoint()
        return True

    def commit_group(self, app_id: str, version: int, adds: list[dict[str, Any]], swaps: list[tuple[str, dict | None]],
                     record: dict[str, Any], step: str = "group") -> bool:
        """One commit: add the group's data files (`adds`: add facts) and replace each old file in
        `swaps` ((path, its rewrite's add facts or None)) -- the old rows of the images this group
        re-processes, or prunes, leave in the same commit their new rows land. `version` numbers
        the run's commits from 1. False when the commit was already made."""
        from deltalake.transaction import RemoveAction

        now = int(time.time() * 1000)
        sizes = self.file_sizes() if swaps else {}
        actions = [*(_add_action(a) for a in adds),
                   *(RemoveAction(path, True, now, sizes.get(path), None) for path, _ in swaps),
                   *(_add_action(new) for _, new in swaps if new is not None)]
        return self._commit(actions, app_id, version, {RUN_KEY: record}, step)

    def record(self, app_id: str, version: int, record: dict[str, Any]) -> None:
        """A commit without data that records the run's end (complete or not, exit reason)."""
        self._commit([], app_id, version, {RUN_KEY: record}, "record")


class Replacements:
    """Which data file holds the old row of each image a run replaces (re-processed or pruned),
    kept current as commits swap files for their rewrites: a file may hold images replaced in
    several groups, and each group's commit rewrites the file its predecessor left.

    A run that plans part by part adds the images of each part (`add`) while groups commit: the
    files it names are those of the table as the plan read it, so a file swapped since then stands
    for its rewrite (`moved`). Thread-safe: the planner adds while the committer takes and swaps."""

    def __init__(self, holders: dict[str, str], prune: Sequence[str] = ()) -> None:
        """holders: image id -> data file (relative to the table) of its row; prune: ids to drop in
        the next commit (they have no new row)."""
        self.file_of: dict[str, str] = {}
        self.ids_in: dict[str, set[str]] = {}
        self.moved: dict[str, str | None] = {}  # swapped file -> its rewrite (None: nothing left)
        self.prune_ids: list[str] = []
        self.lock = threading.Lock()
        self.add(holders, prune)

    def add(self, holders: dict[str, str], prune: Sequence[str] = ()) -> None:
        with self.lock:
            for image_id, path in holders.items():
                while path in self.moved:
                    path = self.moved[path]
                    assert path is not None, f"{image_id}: its file was rewritten to nothing before it was replaced"
                self.file_of[image_id] = path
                self.ids_in.setdefault(path, set()).add(image_id)
            self.prune_ids += [i for i in prune if i in self.file_of]

    def take(self, image_ids: Sequence[str]) -> dict[str, list[str]]:
        """path -> ids to drop from it in the commit that adds `image_ids`' new rows (plus any
        prune not yet committed)."""
        drops: dict[str, list[str]] = {}
        with self.lock:
            for image_id in dict.fromkeys([*image_ids, *self.prune_ids]):
                path = self.file_of.get(image_id)
                if path is not None:
                    drops.setdefault(path, []).append(image_id)
        return drops

    def swapped(self, drops: dict[str, list[str]], swaps: Sequence[tuple[str, dict[str, Any] | None]]) -> None:
        """After the commit: the dropped ids are gone, the others of a swapped file moved to its rewrite."""
        with self.lock:
            for path, new in swaps:
                self.moved[path] = new["path"] if new is not None else None
                left = self.ids_in.pop(path, set()) - set(drops.get(path, ()))
                for image_id in drops.get(path, ()):
                    self.file_of.pop(image_id, None)
                if left:
                    assert new is not None, f"{path}: rewritten to nothing, yet it holds {sorted(left)[:3]}"
                    self.ids_in[new["path"]] = left
                    for image_id in left:
                        self.file_of[image_id] = new["path"]
            self.prune_ids = [i for i in self.prune_ids if i in self.file_of]

    def pending_prune(self) -> bool:
        return bool(self.prune_ids)


def _add_action(a: dict[str, Any]) -> Any:
    from deltalake.transaction import AddAction

    return AddAction(a["path"], a["size"], {}, a["modification_time"], True, a["stats"])

