"""A run's plan made part by part while its input is still being listed (issue 22: the first
shards reach the actors seconds after the start, not after a listing of millions of keys).

For each listing part, in key order, a thread here:

    1. snapshots it (`_runs/<run_id>/listing/part-NNNNN.parquet`, atomic) unless it was read back
       from an interrupted run's snapshot: no shard of a part can commit before its snapshot exists;
    2. classifies it against the images table as the run read it once at its start (parts are
       disjoint key ranges, so each is planned alone: pipeline/planning/plan.py `Classifier`);
    3. hands its shards over (`on_shards`: the driver's collector learns them, then the feed gets
       their rows) and adds the rows they replace to the run's `Replacements`;
    4. waits for `room` (the feed's backlog under a part's rows) before it asks the listing for the
       next part: the planned rows wait in the driver only a part ahead of the actors.

Once the last part is planned, the table rows no part listed are the vanished ones (with --prune
their deletion joins the next commit) and the plan's counts are final. Exactly once holds as
before: every commit is whole, images committed by any run are done in the next plan, and a
killed run's parts are continued, never re-listed (pipeline/planning/parts.py).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

from pipeline.config import SegmentConfig
from pipeline.tables.delta import Replacements
from pipeline.tables.hooks import kill_point, pause_point

from .parts import record_of, write_part
from .plan import Classifier, Plan
from .sources import Listing, Span

PLAN_COUNTS = ("listed", "done", "new", "changed", "to_retry")


class PlanStream:
    """Plans `plan.parts` in a thread (`start`); `counts`, `pending` (images to run) and `shards`
    grow as parts are planned; `vanished` is set once the listing has ended (`ended`)."""

    def __init__(self, plan: Plan, config: SegmentConfig, classifier: Classifier, replacements: Replacements,
                 record: dict[str, Any], on_shards: Callable[[list[Span], Listing], None],
                 on_end: Callable[[], None], log: Callable[[str], None],
                 room: Callable[[], None] = lambda: None) -> None:
        self.plan, self.config, self.classifier, self.replacements = plan, config, classifier, replacements
        self.record, self.on_shards, self.on_end, self.log = record, on_shards, on_end, log
        self.room = room  # returns once the next part may be planned (the feed has room for it)
        self.counts = dict.fromkeys(PLAN_COUNTS, 0)
        self.parts = 0  # planned (each part's listing is let go once its shards are handed over)
        self.pending = 0
        self.shards = 0
        self.changed = 0
        self.vanished: list[str] = []
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.some_shards = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ifcn-plan", daemon=True)

    def start(self) -> PlanStream:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Plans no further part (a run that failed; close the feed too, so that `room` returns);
        the listing stops with the thread."""
        self.stopping = True

    def wait_for_work(self) -> None:
        """Until some shards are planned or the listing has ended (with none: nothing to run)."""
        with self.some_shards:
            self.some_shards.wait_for(lambda: self.shards or self.ended.is_set())

    def check(self) -> None:
        """Raises the planner's error (a listing that failed mid-way), once it has ended."""
        self.ended.wait()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            for part in self.plan.parts:
                if self.stopping:
                    return
                pause_point("before_part")
                if not part.snapshotted:
                    write_part(self.plan.store, self.plan.listing_path, part)
                kill_point("after_part")  # snapshotted, none of its shards handed over
                self._plan(part)
                if not part.last:
                    self.room()  # before the listing is asked for the next part
            kill_point("listing_ended")
            vanished = self.classifier.vanished()
            if self.config.prune:
                self.replacements.add(self.classifier.holders(vanished), vanished.to_pylist())
            self.vanished = vanished.to_pylist()
            self.record["planned"] = self.plan_counts()
        except BaseException as e:  # noqa: BLE001 - raised in the driver by `check`
            self.error = e
        finally:
            with self.some_shards:
                self.ended.set()
                self.some_shards.notify_all()
            self.on_end()

    def _plan(self, part: Any) -> None:
        planned = self.classifier.part(part.listing)
        spans = planned.pending.spans(self.config.shard_size, self.shards)
        self.replacements.add(planned.holders)  # before its shards can commit
        self.counts = {k: self.counts[k] + planned.counts[k] for k in PLAN_COUNTS}
        self.changed += len(planned.changed)
        self.parts += 1
        self.record.update(planned=self.plan_counts(), **record_of(self.parts, part),
                           skipped_keys=dict(sorted(dict(self.plan.skipped).items())))
        if spans:
            self.on_shards(spans, planned.pending)
        with self.some_shards:
            self.pending += len(planned.pending)
            self.shards += len(spans)
            self.some_shards.notify_all()

    def plan_counts(self) -> dict[str, int]:
        return {**self.counts, "vanished": len(self.vanished)}

    def final_plan(self) -> Plan:
        """The plan as it ended (counts, vanished; the listing itself stays in its parts)."""
        return dataclasses.replace(self.plan, counts=self.plan_counts(), vanished=self.vanished,
                                   skipped=dict(sorted(self.plan.skipped.items())))
