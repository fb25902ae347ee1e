"""One run per output: a fresh foreign lease refuses a second run in one line; stale or dead-owner
leases are taken over; of two runs racing for a lease exactly one gets it; heartbeats advance.

Run: pytest tests/test_lease.py -q
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline import lease as lease_mod
from pipeline.config import SegmentError
from pipeline.lease import LEASE_FILE, Lease
from pipeline.sink import OutputStore


def _foreign(out: Path, age_s: float, host: str = "other-host", pid: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE_FILE).write_text(json.dumps({"owner": "someone", "host": host, "pid": pid,
                                              "heartbeat": time.time() - age_s}))


def test_fresh_foreign_lease_refuses_in_one_line(tmp_path: Path) -> None:
    _foreign(tmp_path, age_s=5)
    with pytest.raises(SegmentError) as e:
        Lease(OutputStore(str(tmp_path))).acquire(settle_s=0)
    msg = str(e.value)
    assert "in use by another run (host other-host, pid 1, heartbeat 5 s ago)" in msg and "\n" not in msg
    assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == "someone"  # untouched


@pytest.mark.parametrize("case", ["stale", "dead_pid_here"])
def test_stale_or_dead_lease_is_taken_over_and_released(tmp_path: Path, case: str) -> None:
    if case == "stale":
        _foreign(tmp_path, age_s=lease_mod.STALE_S + 1)
    else:  # this host, a pid that cannot exist: a killed job re-run at once
        _foreign(tmp_path, age_s=1, host=socket.gethostname(), pid=2**22 + 12345)
    lease = Lease(OutputStore(str(tmp_path)))
    lease.acquire(settle_s=0)
    held = json.loads((tmp_path / LEASE_FILE).read_text())
    assert held["owner"] == lease.owner["owner"] and held["host"] == socket.gethostname()
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()
    lease.release()  # idempotent


def test_heartbeat_advances_while_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    lease = Lease(OutputStore(str(tmp_path)))
    lease.acquire(settle_s=0)
    first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.4)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > first
    lease.release()


def test_two_racing_runs_one_wins(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path))
    a, b = Lease(store), Lease(store)
    errors: dict[str, Exception] = {}

    def take(name: str, lease: Lease, delay: float) -> None:
        time.sleep(delay)
        try:
            lease.acquire(settle_s=0.5)
        except SegmentError as e:
            errors[name] = e

    threads = [threading.Thread(target=take, args=("a", a, 0.0)), threading.Thread(target=take, args=("b", b, 0.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1  # exactly one run holds the output; the other got a one-line refusal
    (loser,) = errors
    winner = b if loser == "a" else a
    assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == winner.owner["owner"]
    assert "another run" in str(errors[loser])
    winner.release()


def test_prepare_refuses_before_touching_the_output(tmp_path: Path) -> None:
    """The second run must not delete the first run's shards in flight (uncommitted part files)."""
    from pipeline.config import SegmentConfig
    from pipeline.run import prepare
    from segment_helpers import write_checkpoint, write_images

    write_images(tmp_path / "images", ["a.png"])
    out = tmp_path / "out"
    in_flight = out / "masks" / "part-000000.parquet"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"being written by the first run")
    _foreign(out, age_s=1)
    config = SegmentConfig(input=str(tmp_path / "images"), output=str(out),
                           checkpoint=write_checkpoint(tmp_path / "m.pt"))
    with pytest.raises(SegmentError, match="in use by another run"):
        prepare(config, Lease(OutputStore(str(out))))
    assert in_flight.exists()
