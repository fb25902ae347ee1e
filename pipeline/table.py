"""The output tables: two Delta Lake tables, `OUT/masks` and `OUT/images`, and how they are committed.

Who does what (no mask bytes pass through the driver):
    workers (publish tasks) write each shard's rows as one Parquet file per table straight into
        the table folder (`write_data_file`) and return its add-action facts (path, size, stats);
    the driver commits groups of finished shards (`OutputTables.commit_group`): the masks table
    first, then the images table, each commit carrying the app transaction (run_id, group
    number) and the run's record in its commit metadata.

The invariant (exactly once, across both tables and any kill): an images row means every masks
row of that image (same run_id) is visible, and no image has rows from two runs. It holds because
    - a group's images commit never precedes its masks commit;
    - a commit is skipped when the table's app transaction for the run already has its group
      number (a re-sent commit after an ambiguous storage error adds nothing twice);
    - a run killed between a group's masks and images commits left the images files written and
      named in the masks commit's metadata: the next run rolls that group forward (commits those
      images files with the same app transaction) before it plans. Rolling forward rather than
      deleting the orphan mask rows keeps the work already done and rewrites no file;
    - an image re-processed (its object changed, or it was a 'retry' row) has its old rows
      deleted from images, then from masks, before any new row of it is committed.
A data file that no commit adds (a task killed mid-write, a publish retried) is invisible to
every Delta reader and is removed by `vacuum`.
"""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from .errors import STORAGE_ATTEMPTS, STORAGE_BACKOFF_S
from .schema import IMAGES_SCHEMA, MASKS_ROW_GROUP_ROWS, MASKS_SCHEMA

TABLES = ("masks", "images")  # commit order: a group's images rows never appear before its masks rows
SCHEMAS = {"masks": MASKS_SCHEMA, "images": IMAGES_SCHEMA}
ROW_GROUPS = {"masks": MASKS_ROW_GROUP_ROWS, "images": None}
RUN_KEY = "ifcn.run"  # commit metadata: the run's record (run id, settings, counts, complete, exit)
GROUP_KEY = "ifcn.group"  # masks commit metadata: {app_id, version, images: [add facts]} for roll-forward
CHECKPOINT_EVERY = 100  # versions between Delta checkpoints: opening the table reads one Parquet + a few JSON
DELETE_CHUNK = 500  # image ids per delete predicate
# Columns whose min/max go into a file's stats (short strings and numbers: what readers prune on).
STATS_COLUMNS = frozenset({"image_id", "shard_id", "run_id", "status", "rank", "score", "area", "height", "width",
                           "scale", "num_proposals", "size"})
STATE_COLUMNS = ("image_id", "status", "etag", "size")  # what planning compares a listing with
KILL_ENV = "IFCN_TEST_KILL_AT"  # tests: "<step>:<n>" SIGKILLs the driver at step of its n-th group commit


def delta_storage_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    """fsspec storage options (and AWS_* env) -> delta-rs object-store options.

    S3 commits need a conditional put (`conditional_put: etag`): two writers of one version must
    not both win. A plain-http endpoint (a local S3 server) needs AWS_ALLOW_HTTP."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    so = storage_options or {}
    kwargs = so.get("client_kwargs", {}) or {}
    endpoint = (kwargs.get("endpoint_url") or so.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    out = {"conditional_put": "etag"}
    region = kwargs.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    for key, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", so.get("key")),
                       ("AWS_SECRET_ACCESS_KEY", so.get("secret")), ("AWS_SESSION_TOKEN", so.get("token")),
                       ("AWS_REGION", region)):
        if value:
            out[key] = str(value)
    if endpoint and endpoint.startswith("http://"):
        out["AWS_ALLOW_HTTP"] = "true"
    return out


def table_uri(output: str, name: str) -> str:
    """`output`/`name` as deltalake opens it (local paths made absolute)."""
    if "://" not in output:
        output = os.path.abspath(output)
    return f"{output.rstrip('/')}/{name}"


def file_stats(table: pa.Table) -> str:
    """Delta add-action stats of a data file: numRecords, and min/max/nullCount of STATS_COLUMNS."""
    mins, maxs, nulls = {}, {}, {}
    for name in table.column_names:
        if name not in STATS_COLUMNS:
            continue
        col = table.column(name)
        nulls[name] = col.null_count
        if col.null_count < len(col):
            mm = pc.min_max(col)
            mins[name], maxs[name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def write_data_file(fs, root: str, name: str, table: pa.Table, shard_id: str, run_id: str) -> dict[str, Any]:
    """Writes one shard's rows of table `name` into its folder (`root`/`name`, no protocol) as
    `part-<shard>-<run>-<uuid>.parquet`; returns the add action's facts (the driver commits them)."""
    from ifcn.io import put_atomic

    from .sink import parquet_bytes

    data = parquet_bytes(table, ROW_GROUPS[name])
    file = f"part-{shard_id}-{run_id}-{uuid.uuid4().hex}.parquet"
    put_atomic(fs, f"{root}/{name}/{file}", data)
    return {"path": file, "size": len(data), "modification_time": int(time.time() * 1000),
            "stats": file_stats(table)}


def _kill_point(step: str, group: int) -> None:
    """Test hook: SIGKILL this process at `step` of its `group`-th (1-based) group commit."""
    spec = os.environ.get(KILL_ENV, "")
    at, _, n = spec.partition(":")
    if at == step and int(n or 1) == group:
        os.kill(os.getpid(), signal.SIGKILL)


def table_dataset(dt: Any, table: str, options: dict[str, str] | None = None,
                  image_ids: Sequence[str] | None = None) -> ds.Dataset:
    """The active data files of DeltaTable `dt` (`table`: "masks" or "images") as one pyarrow
    dataset; with `image_ids`, only the files whose image_id min/max can hold one of them (files
    without statistics are kept)."""
    import pyarrow.fs as pafs
    from deltalake.fs import DeltaStorageHandler

    adds = pa.table(dt.get_add_actions(flatten=True))
    paths = adds.column("path").to_pylist()
    if image_ids is not None and adds.num_rows and "min.image_id" in adds.column_names:
        ids = np.unique(np.asarray(list(image_ids), dtype=object))
        lo = adds.column("min.image_id").to_numpy(zero_copy_only=False)
        hi = adds.column("max.image_id").to_numpy(zero_copy_only=False)
        no_stats = np.array([a is None or b is None for a, b in zip(lo, hi)], dtype=bool)
        lo, hi = np.where(no_stats, "", lo), np.where(no_stats, "", hi)
        # a file can hold an id when some sorted id falls in [min, max]
        holds = np.searchsorted(ids, hi, side="right") > np.searchsorted(ids, lo, side="left")
        paths = [p for p, keep in zip(paths, holds | no_stats) if keep]
    fs = pafs.PyFileSystem(DeltaStorageHandler(dt.table_uri, options or None))
    return ds.FileSystemDataset.from_paths(paths, schema=SCHEMAS[table], format=ds.ParquetFileFormat(),
                                           filesystem=fs)


class OutputTables:
    """The two Delta tables of one output, opened lazily and kept up to date by this driver."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None,
                 guard: Callable[[], None] | None = None, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        """guard: called before every commit; raises to stop writing (the run's `Lease.check`)."""
        self.output, self.checkpoint_every = output, checkpoint_every
        self.options = delta_storage_options(output, storage_options)
        self.guard = guard or (lambda: None)
        self._open: dict[str, Any] = {}

    def uri(self, name: str) -> str:
        return table_uri(self.output, name)

    def open(self, name: str, version: int | None = None):
        """The DeltaTable `name`, or None when it does not exist yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if version is None and name in self._open:
            return self._open[name]
        try:
            dt = DeltaTable(self.uri(name), version=version, storage_options=self.options or None)
        except TableNotFoundError:
            return None
        if version is None:
            self._open[name] = dt
        return dt

    def refresh(self) -> None:
        """Forget the opened tables: the next read sees commits made since (e.g. by a run whose
        stale lease this one took over)."""
        self._open.clear()

    def settings(self) -> dict[str, Any] | None:
        """The settings the output's results were made with (the masks table's description)."""
        dt = self.open("masks")
        if dt is None:
            return None
        try:
            return json.loads(dt.metadata().description or "{}")
        except json.JSONDecodeError:
            return {}

    def images_state(self, cols: list[str] | None = None) -> pa.Table:
        """`cols` (default image_id, status, etag, size: what planning compares a listing with) of
        every images row."""
        dt = self.open("images")
        cols = cols or list(STATE_COLUMNS)
        if dt is None:
            return IMAGES_SCHEMA.empty_table().select(cols)
        return table_dataset(dt, "images", self.options).to_table(columns=cols)

    def last_run(self) -> dict[str, Any] | None:
        """The newest run record in the images table's history (None: no run committed anything)."""
        for name in ("images", "masks"):
            dt = self.open(name)
            for commit in dt.history(20) if dt is not None else ():
                if RUN_KEY in commit:
                    return commit[RUN_KEY]
        return None

    def runs(self) -> list[dict[str, Any]]:
        """Every run's latest record, oldest run first (reads the whole history: jobs.show --history)."""
        seen: dict[str, dict[str, Any]] = {}
        for name in ("images", "masks"):
            dt = self.open(name)
            for commit in dt.history() if dt is not None else ():  # newest first
                record = commit.get(RUN_KEY)
                if record and record["run_id"] not in seen:
                    seen[record["run_id"]] = {**record, "table_version": commit.get("version"),
                                              "timestamp": commit.get("timestamp")}
        return sorted(seen.values(), key=lambda r: r.get("started_at", ""))

    # --- commits --------------------------------------------------------------------------
    def _commit(self, name: str, adds: list[dict[str, Any]], app_id: str, version: int,
                metadata: dict[str, Any], settings: dict[str, Any]) -> bool:
        """One commit of `adds` to table `name` with app transaction (app_id, version); False when
        the table already has it (a re-sent commit). Creates the table on its first commit.

        Storage failures are retried with backoff (STORAGE_ATTEMPTS, ~30 s): an attempt whose
        commit landed although its answer was lost is found by the app transaction and not repeated."""
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return self._commit_once(name, adds, app_id, version, metadata, settings)
            except Exception:
                if attempt == STORAGE_ATTEMPTS - 1:
                    raise
                self._open.pop(name, None)  # re-read the log: the table may have moved on
                time.sleep(STORAGE_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _commit_once(self, name: str, adds: list[dict[str, Any]], app_id: str, version: int,
                     metadata: dict[str, Any], settings: dict[str, Any]) -> bool:
        from deltalake import Schema
        from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

        self.guard()
        dt = self.open(name)
        if dt is not None:
            dt.update_incremental()
            done = dt.transaction_version(app_id)
            if done is not None and done >= version:
                return False
        actions = [AddAction(a["path"], a["size"], {}, a["modification_time"], True, a["stats"]) for a in adds]
        props = CommitProperties(custom_metadata=metadata, app_transactions=[Transaction(app_id, version)])
        if dt is None:
            create_table_with_add_actions(self.uri(name), Schema.from_arrow(SCHEMAS[name]), actions, mode="error",
                                          description=json.dumps(settings, sort_keys=True),
                                          storage_options=self.options or None, commit_properties=props)
            self.open(name)
        else:
            dt.create_write_transaction(actions, "append", dt.schema(), commit_properties=props)
            dt.update_incremental()
            if dt.version() % self.checkpoint_every == 0:
                dt.create_checkpoint()
        return True

    def commit_group(self, app_id: str, version: int, results: list[dict[str, Any]], record: dict[str, Any],
                     settings: dict[str, Any]) -> None:
        """Commits finished shards (publish results): masks first, whose metadata names the images
        files, then images. `version` numbers the run's groups from 1."""
        images = [r["images"] for r in results]
        _kill_point("before_masks", version)
        self._commit("masks", [r["masks"] for r in results], app_id, version,
                     {RUN_KEY: record, GROUP_KEY: {"app_id": app_id, "version": version, "images": images}}, settings)
        _kill_point("between", version)
        self._commit("images", images, app_id, version, {RUN_KEY: record}, settings)
        _kill_point("after_both", version)

    def record(self, app_id: str, version: int, record: dict[str, Any], settings: dict[str, Any]) -> None:
        """A commit without data that records the run's end (complete or not, exit reason)."""
        self._commit("images", [], app_id, version, {RUN_KEY: record}, settings)

    def overwrite(self, record: dict[str, Any], settings: dict[str, Any]) -> None:
        """A new version of both tables with no rows and `settings` (images first: an images row
        never outlives its masks rows); older versions stay readable (`read_output(version=)`)."""
        from deltalake import Schema
        from deltalake.transaction import CommitProperties, create_table_with_add_actions

        for name in ("images", "masks"):
            if self.open(name) is not None:
                self.guard()
                create_table_with_add_actions(self.uri(name), Schema.from_arrow(SCHEMAS[name]), [], mode="overwrite",
                                              description=json.dumps(settings, sort_keys=True),
                                              storage_options=self.options or None,
                                              commit_properties=CommitProperties(custom_metadata={RUN_KEY: record}))
        self.refresh()

    def roll_forward(self, record: dict[str, Any], settings: dict[str, Any]) -> int:
        """Finishes a group whose masks commit landed and whose images commit did not (a run killed
        between the two): commits its images files with the same app transaction. Returns the
        number of shards rolled forward."""
        masks = self.open("masks")
        if masks is None:
            return 0
        group = next((c[GROUP_KEY] for c in masks.history(10) if GROUP_KEY in c), None)
        if group is None:
            return 0
        images = self.open("images")
        done = images.transaction_version(group["app_id"]) if images is not None else None
        if done is not None and done >= group["version"]:
            return 0
        self._commit("images", group["images"], group["app_id"], group["version"],
                     {RUN_KEY: {**record, "exit": f"rolled forward group {group['version']} of {group['app_id']}"}},
                     settings)
        return len(group["images"])

    def delete_images(self, image_ids: list[str], tables: tuple[str, ...], record: dict[str, Any]) -> None:
        """Removes every row of these images, images table first (an images row never outlives
        its masks rows), in predicate chunks of DELETE_CHUNK ids."""
        from deltalake.transaction import CommitProperties

        for name in sorted(tables, key=lambda t: t != "images"):
            dt = self.open(name)
            if dt is None:
                continue
            for i in range(0, len(image_ids), DELETE_CHUNK):
                ids = ", ".join("'" + x.replace("'", "''") + "'" for x in image_ids[i:i + DELETE_CHUNK])
                self.guard()
                dt.delete(f"image_id IN ({ids})", commit_properties=CommitProperties(custom_metadata={RUN_KEY: record}))
            dt.update_incremental()
