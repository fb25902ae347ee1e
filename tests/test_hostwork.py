"""ifcn.batch.hostwork: device routines whose host work runs on the driving thread, and the overlap share.

Run: pytest tests/test_hostwork.py -q
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ifcn.batch.hostwork import Host, Span, drive, overlap_share


def _routine(log: list[tuple[str, str]]):
    log.append(("device", threading.current_thread().name))
    planned = yield Host(lambda a, b: (log.append(("host", threading.current_thread().name)), a + b)[1], 2, 3)
    log.append(("device", threading.current_thread().name))
    return planned * 10


def test_split_runs_host_items_on_the_caller_and_the_rest_on_the_device_thread() -> None:
    log: list[tuple[str, str]] = []
    spans: list[Span] = []
    with ThreadPoolExecutor(1, "dev") as device:
        assert drive(_routine(log), device, spans) == 50
    me = threading.current_thread().name
    assert log == [("device", "dev_0"), ("host", me), ("device", "dev_0")]
    assert [k for k, _, _ in spans] == ["device", "host", "device"]
    inline: list[tuple[str, str]] = []
    assert drive(_routine(inline)) == 50 and {t for _, t in inline} == {me}


def test_a_failing_host_item_closes_the_routine_and_raises() -> None:
    closed = []

    def routine():
        try:
            yield Host(lambda: 1 / 0)
        finally:
            closed.append(threading.current_thread().name)

    with ThreadPoolExecutor(1, "dev") as device, pytest.raises(ZeroDivisionError):
        drive(routine(), device)
    assert closed == ["dev_0"]  # its `finally` ran on the device thread


def test_overlap_share_counts_host_time_under_another_calls_device_time() -> None:
    a = [("host", 0.0, 2.0), ("device", 2.0, 3.0), ("host", 3.0, 5.0)]
    b = [("device", 1.0, 2.5), ("host", 2.5, 3.0), ("device", 4.0, 4.5)]
    # a's host: [0, 2] under b's device [1, 2]: 1; [3, 5] under [4, 4.5]: 0.5; b's host [2.5, 3] under a's [2, 3]: 0.5
    assert overlap_share([a, b]) == pytest.approx((1.0 + 0.5 + 0.5) / (4.0 + 0.5))
    assert overlap_share([a]) == 0.0 and overlap_share([]) == 0.0
