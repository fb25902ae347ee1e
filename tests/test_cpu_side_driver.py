"""bench/cpu_side.py's driver split by thread: a thread named as Ray Data names its executor loop is
charged to "executor loop" with its run time; one Python does not know would be Ray core's.

Run: pytest tests/test_cpu_side_driver.py -q
"""
from __future__ import annotations

import threading
import time

from bench.cpu_side import DriverThreads

BURN_S = 0.6  # a few of /proc's 10 ms clock ticks, and longer than one sample interval


def _burn(burnt: threading.Event, stop: threading.Event) -> None:
    end = time.thread_time() + BURN_S
    while time.thread_time() < end:
        pass
    burnt.set()
    stop.wait()  # alive until the last sample: an ended thread leaves /proc/self/task


def test_a_named_thread_is_charged_to_its_role_and_the_executor_time_is_its_life() -> None:
    threads = DriverThreads()
    stop = threading.Event()
    burnt = [threading.Event() for _ in range(3)]
    workers = [threading.Thread(target=_burn, args=(done, stop), name=name, daemon=True)
               for name, done in zip(("StreamingExecutor-dataset_0", "iter_threaded", "someone-else"), burnt)]
    for w in workers:
        w.start()
    for done in burnt:
        assert done.wait(120)
    by_role = threads.stop()
    stop.set()
    for w in workers:
        w.join()
    for role in ("executor loop", "batch consumer", "other python"):
        assert by_role[role] >= BURN_S * 0.5, (role, by_role)  # tick rounding and a late first sample
    assert by_role["executor s"] > 0
    assert "ray core (C++)" not in by_role or by_role["ray core (C++)"] < BURN_S * 0.5  # no C++ threads burned here
