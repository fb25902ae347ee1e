"""The output folder: atomic shard commits, the job fingerprint, the run manifest.

A shard is committed in three steps, and only the last one makes it visible:
    1. its images and masks tables are written as Parquet under `_tmp/<random>/`;
    2. both files are moved to `images/part-<shard>.parquet` and `masks/part-<shard>.parquet`;
    3. `_commits/<shard>.json` (counts and the shard's input digest) is written (temp + move).
A job killed between 2 and 3 leaves files of an uncommitted shard; the next run deletes them
before it starts (`remove_uncommitted`) and writes the shard again under the same names, so
files can be overwritten but never duplicated. Readers never see `_tmp/` (they read
`masks/`, `images/`, and skip `_`-prefixed names).
"""
from __future__ import annotations

import io
import json
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ifcn.io import filesystem

from .schema import MASKS_ROW_GROUP_ROWS, PARQUET_COMPRESSION, reduced_to_tables
from .sources import Shard

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"  # empty, written last by a complete run (the Hadoop/Spark convention)
MANIFEST_FILE = "_manifest.json"
COMMITS_DIR = "_commits"
TMP_DIR = "_tmp"
TABLES = ("images", "masks")


class OutputStore:
    """One job's output folder on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, root = filesystem(url, storage_options)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- small JSON files -------------------------------------------------------------
    def read_json(self, name: str) -> dict[str, Any] | None:
        p = self.path(name)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            return json.loads(f.read())

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        """Atomic on filesystems with rename, and never half-written on object stores."""
        self._put_atomic(json.dumps(obj, indent=2, sort_keys=True).encode(), self.path(name))

    # --- commits ----------------------------------------------------------------------
    def committed(self) -> dict[str, dict[str, Any]]:
        """shard_id -> commit marker, for every committed shard."""
        d = self.path(COMMITS_DIR)
        if not self.fs.exists(d):
            return {}
        self.fs.invalidate_cache(d)
        out = {}
        for p in self.fs.ls(d, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".json") and not name.startswith("."):
                with self.fs.open(p, "rb") as f:
                    marker = json.loads(f.read())
                out[marker["shard_id"]] = marker
        return out

    def remove_uncommitted(self, committed: set[str]) -> int:
        """Deletes `_tmp/` and table files of shards without a commit marker; returns files removed."""
        removed = 0
        _remove_quietly(self.fs, self.path(TMP_DIR))
        for table in TABLES:
            d = self.path(table)
            if not self.fs.exists(d):
                continue
            self.fs.invalidate_cache(d)
            for p in self.fs.ls(d, detail=False):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("part-") and name.endswith(".parquet") and _shard_of(name) not in committed:
                    self.fs.rm(p)
                    removed += 1
        return removed

    def commit(self, shard: Shard, reduced: pa.Table) -> dict[str, Any]:
        """Writes one shard's tables (REDUCED_SCHEMA rows, one per image) and then its marker."""
        images, masks = reduced_to_tables(reduced)
        got = images.column("image_id").to_pylist()
        want = sorted(it.image_id for it in shard.items)
        if got != want:  # a lost or duplicated image would be silently wrong output: refuse to commit
            raise RuntimeError(f"shard {shard.shard_id}: got images {got[:5]}..., expected {want[:5]}... "
                               f"({len(got)} vs {len(want)}); not committing it")
        tmp = self.path(TMP_DIR, uuid.uuid4().hex)
        name = f"part-{shard.shard_id}.parquet"
        for table_name, table, group in (("masks", masks, MASKS_ROW_GROUP_ROWS), ("images", images, None)):
            self._put(_parquet_bytes(table, group), f"{tmp}/{table_name}/{name}")
        for table_name in TABLES:
            self.fs.makedirs(self.path(table_name), exist_ok=True)
            self.fs.mv(f"{tmp}/{table_name}/{name}", self.path(table_name, name))
        _remove_quietly(self.fs, tmp)  # object stores have no empty folders to remove
        status = images.column("status").to_pylist()
        marker = {"shard_id": shard.shard_id, "digest": shard.digest, "num_images": images.num_rows,
                  "num_ok": status.count("ok"), "num_error": status.count("error"),
                  "num_proposals": masks.num_rows, "files": [f"{t}/{name}" for t in TABLES],
                  "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.write_json(f"{COMMITS_DIR}/{shard.shard_id}.json", marker)
        return marker

    def remove_tmp(self) -> None:
        """Drops `_tmp/` once a run has nothing left in flight."""
        _remove_quietly(self.fs, self.path(TMP_DIR))

    def remove(self, name: str) -> None:
        _remove_quietly(self.fs, self.path(name))

    def mark_success(self) -> None:
        """Writes the empty `_SUCCESS` (an empty object is written whole or not at all)."""
        self._put(b"", self.path(SUCCESS_FILE))

    # --- helpers ----------------------------------------------------------------------
    def _put(self, data: bytes, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def _put_atomic(self, data: bytes, path: str) -> None:
        tmp = self.path(TMP_DIR, f"{uuid.uuid4().hex}.tmp")
        self._put(data, tmp)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, path)


def _parquet_bytes(table: pa.Table, row_group_size: int | None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=PARQUET_COMPRESSION, row_group_size=row_group_size,
                   write_statistics=True)
    return buf.getvalue()


def _remove_quietly(fs, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _shard_of(file_name: str) -> str:
    """'part-000012.parquet' -> '000012'."""
    return file_name[len("part-"):-len(".parquet")]
