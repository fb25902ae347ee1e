"""CommitTicker: finished publishes are committed while no batch arrives, and its errors reach the driver."""
from __future__ import annotations

import threading

import pytest

from pipeline.commit import CommitTicker
from pipeline.tables.delta import LeaseLostError


class _Collector:
    def __init__(self) -> None:
        self.results: list[dict] = []
        self.batches: list[object] = []

    def add(self, batch: object) -> None:
        self.batches.append(batch)

    def collect(self) -> None:
        pass

    def take(self) -> list[dict]:
        out, self.results = self.results, []
        return out


class _Committer:
    def __init__(self, fail: bool = False) -> None:
        self.committed: list[dict] = []
        self.fail = fail
        self.done = threading.Event()

    def add(self, results: list[dict]) -> None:
        if results and self.fail:
            raise LeaseLostError("lost the lease")
        self.committed += results
        if results:
            self.done.set()


def test_a_finished_publish_is_committed_while_no_batch_arrives() -> None:
    collector, committer = _Collector(), _Committer()
    with CommitTicker(collector, committer, every_s=0.01) as ticker:
        ticker.step("batch-1")
        collector.results.append({"shard_id": "s0"})  # a publish finished after the last batch
        assert committer.done.wait(10), "the ticker never committed the finished shard"
    assert committer.committed == [{"shard_id": "s0"}] and collector.batches == ["batch-1"]


def test_an_error_in_the_ticker_is_raised_in_the_driver_loop() -> None:
    collector, committer = _Collector(), _Committer(fail=True)
    with pytest.raises(LeaseLostError):
        with CommitTicker(collector, committer, every_s=0.01) as ticker:
            collector.results.append({"shard_id": "s0"})
            ticker.thread.join(10)  # the ticker stops at its first error
            ticker.step("batch-2")
    assert not committer.committed and collector.batches == []
