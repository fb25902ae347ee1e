"""The output folder on any fsspec filesystem: its paths, small JSON files, the staging area
`_tmp/` that a finished run removes, and the run ids that name what a run writes there."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ifcn.io import filesystem, put_atomic

TMP_DIR = "_tmp"


class OutputStore:
    """One job's output folder on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.fs, root = filesystem(url, storage_options)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- small JSON files -------------------------------------------------------------
    def read_json(self, name: str) -> dict[str, Any] | None:
        p = self.path(name)
        try:
            return json.loads(self.fs.cat_file(p))
        except FileNotFoundError:
            return None

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        put_atomic(self.fs, self.path(name), json.dumps(obj, indent=2, sort_keys=True).encode())

    def remove_tmp(self) -> None:
        """Drops `_tmp/` once a run has nothing left in flight."""
        remove_quietly(self.fs, self.path(TMP_DIR))

    def remove(self, name: str) -> None:
        remove_quietly(self.fs, self.path(name))


def remove_quietly(fs, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def new_run_id() -> str:
    """Sorts by start time; unique across machines."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
