"""One run per output: a lease file with owner, host and a heartbeat.

A run takes `_lease.json` before it touches the output (prepare removes uncommitted files, which
would include another live run's shards in flight) and refreshes its heartbeat from a daemon
thread; a second run that finds a fresh lease refuses with one line. A lease whose heartbeat is
older than STALE_S (its run was killed) is taken over. Object stores have no compare-and-swap,
so taking a lease is write, wait, read back: of two runs racing for it, the later writer wins
and the earlier one sees a stranger's lease on read-back and refuses.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from .config import SegmentError
from .sink import OutputStore

LEASE_FILE = "_lease.json"
HEARTBEAT_S = 10.0  # how often a live run rewrites its heartbeat
STALE_S = 60.0  # a lease not refreshed for this long belongs to a dead run (6 missed heartbeats)
SETTLE_S = 1.0  # wait before reading a just-written lease back, so a racing writer shows up


class Lease:
    """Holds an output's lease for one run; `release` (or the context manager) gives it back."""

    def __init__(self, store: OutputStore, now=time.time) -> None:
        self.store, self.now = store, now
        self.owner = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, settle_s: float = SETTLE_S) -> None:
        """Takes the lease or raises SegmentError (one line) naming the run that holds it."""
        held = self._read()
        if held is not None and held.get("owner") != self.owner["owner"]:
            age = self.now() - float(held.get("heartbeat", 0))
            if age < STALE_S and not _dead_here(held):
                raise SegmentError(f"--output {self.store.url} is in use by another run (host {held.get('host')}, "
                                   f"pid {held.get('pid')}, heartbeat {age:.0f} s ago); wait for it to finish, "
                                   f"or use another --output")
        self._write()
        time.sleep(settle_s)
        back = self._read()
        if back is None or back.get("owner") != self.owner["owner"]:
            raise SegmentError(f"--output {self.store.url}: another run took it at the same moment (host "
                               f"{(back or {}).get('host')}); use another --output, or retry when it is done")
        self._thread = threading.Thread(target=self._beat, name="ifcn-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
            self._thread = None
            try:
                held = self._read()
                if held is not None and held.get("owner") == self.owner["owner"]:
                    self.store.remove(LEASE_FILE)
            except Exception:  # storage down: the lease goes stale and the next run takes it over
                pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception:  # a missed heartbeat is survivable; STALE_S allows several
                pass

    def _write(self) -> None:
        self.store.write_json(LEASE_FILE, {**self.owner, "heartbeat": self.now()})

    def _read(self) -> dict[str, Any] | None:
        return self.store.read_json(LEASE_FILE)


def _dead_here(held: dict[str, Any]) -> bool:
    """A lease of this host whose process is gone (e.g. a killed job re-run at once) is stale now."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False
