"""bench/cpu_side.py's driver split by thread: a thread named as Ray Data names its executor loop is
charged to "executor loop" with its run time; one Python does not know would be Ray core's.

Run: pytest tests/test_cpu_side_driver.py -q
"""
from __future__ import annotations

import threading
import time

from bench.cpu_side import DriverThreads, streaming_share

BURN_S = 0.6  # a few of /proc's 10 ms clock ticks, and longer than one sample interval


def _burn(burnt: threading.Event, stop: threading.Event, go: threading.Event | None = None) -> None:
    if go is not None:
        assert go.wait(120)
    end = time.thread_time() + BURN_S
    while time.thread_time() < end:
        pass
    burnt.set()
    stop.wait()  # alive until the last sample: an ended thread leaves /proc/self/task


def test_a_named_thread_is_charged_to_its_role_and_the_executor_time_is_its_life() -> None:
    threads = DriverThreads()
    stop = threading.Event()
    burnt = [threading.Event() for _ in range(3)]
    seen = threading.Event()  # the executor burns once the sampler has seen it: its burn is in the window
    workers = [threading.Thread(target=_burn, args=(done, stop, seen if i == 0 else None), name=name, daemon=True)
               for i, (name, done) in enumerate(zip(("StreamingExecutor-dataset_0", "iter_threaded", "someone-else"),
                                                     burnt))]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 120
    while not threads.streaming_cpu and time.monotonic() < deadline:
        time.sleep(0.05)
    seen.set()
    for done in burnt:
        assert done.wait(120)
    by_role = threads.stop()
    stop.set()
    for w in workers:
        w.join()
    for role in ("executor loop", "batch consumer", "other python"):
        assert by_role[role] >= BURN_S * 0.5, (role, by_role)  # tick rounding and a late first sample
    assert by_role["executor s"] > 0
    # the driver's CPU while the executor lived: at least the executor's own burn, at most every role's
    assert BURN_S * 0.5 <= by_role["streaming cpu s"] <= sum(v for k, v in by_role.items() if " s" not in k) + 0.05
    assert "ray core (C++)" not in by_role or by_role["ray core (C++)"] < BURN_S * 0.5  # no C++ threads burned here


def test_streaming_share_is_the_driver_rate_over_the_steady_throughput() -> None:
    # hand-computed: 0.6 CPU-s while a 10 s executor ran = 6% of a core; 1000 extra images in 20 - 12 = 8 s
    # more = 125 images/s; 6% at 125 images/s = 4.8% of a core per 100 images/s (medians over two rounds)
    def run(wall: float, cpu: float = 0.6, executor: float = 10.0) -> dict:
        return {"wall_s": wall, "driver_threads": {"streaming cpu s": cpu, "executor s": executor}}

    runs = {("project", 2000): [run(20.0), run(21.0, cpu=0.7)], ("project", 1000): [run(12.0), run(13.0)]}
    share, rate, per_100 = streaming_share(runs, "project", (1000, 2000))
    assert abs(share - 6.5) < 1e-9  # median of 6% and 7%
    assert abs(rate - 125.0) < 1e-9
    assert abs(per_100 - 6.5 * 100 / 125) < 1e-9
