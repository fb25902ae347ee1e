"""The Ray Data graph's input while the plan is still being made: rows handed over as planned.

    driver: Feed.put(rows of a part's shards)  ─ thread ─>  queue actor (FEED_BLOCKS blocks at most)
        <─ FEED_TASKS read tasks of one `read_datasource`, each pulling blocks until told the end

The graph (read tasks, inference actors, encoding tasks) is built once and lives for the whole
run; only its input grows. Blocks are `block_rows` rows (image_id, uri, shard_id): what one
`read_images` task decodes in one call. The read tasks only wait on the queue, so they hold no
CPU; the queue is bounded, so the rows the actors have not reached wait here as Arrow columns
rather than as many small objects in the object store. Those rows are bounded too: the planner
plans a part only while fewer than a part's rows wait here (`wait_for_room`), and the listing runs
only a few parts ahead of the planner (pipeline/planning/listing.py `Pace`), so the driver holds a
few parts of a 10M-key bucket at a time, not all of it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Callable

import pyarrow as pa

FEED_TASKS = 2  # read tasks pulling from the queue (each hands over hundreds of blocks a second)
FEED_BLOCKS = 32  # blocks waiting in the queue actor: enough for every actor's next batches
ROWS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("shard_id", pa.string())])


class Feed:
    """Rows (ROWS_SCHEMA) put here in order reach the graph's read tasks in order, `block_rows` at a
    time, once `start` has made the queue; `close` says no more will come."""

    def __init__(self, on_first: Callable[[], None] = lambda: None) -> None:
        self.on_first = on_first  # called once the first block is in the queue
        self.waiting: deque[pa.Table] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.queue: Any = None
        self.thread: threading.Thread | None = None
        self.first_block_at: float | None = None  # time.perf_counter() of the first block handed to the queue
        self.blocks = 0
        self.backlog = 0  # rows put and not yet in the queue actor
        self.error: BaseException | None = None

    def put(self, rows: pa.Table) -> None:
        with self.cond:
            self.waiting.append(rows)
            self.backlog += rows.num_rows
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for_room(self, rows: int) -> None:
        """Until fewer than `rows` rows wait to enter the queue (or the feed is closed): the planner
        calls this before it plans the next part, so a listing that runs hours ahead of the actors
        does not pile its pending rows up here."""
        with self.cond:
            self.cond.wait_for(lambda: self.backlog < rows or self.closed)

    def start(self, block_rows: int, tasks: int = FEED_TASKS, max_blocks: int = FEED_BLOCKS):
        """The queue actor, the thread that fills it, and the Dataset that drains it (lazy)."""
        import ray.data
        from ray.util.queue import Queue

        self.queue = Queue(max_blocks, actor_options={"num_cpus": 0})
        self.thread = threading.Thread(target=self._loop, args=(block_rows, tasks), name="ifcn-feed", daemon=True)
        self.thread.start()
        _install_rule()
        # num_cpus 0: a read task only waits on the queue; unequal to read_images' CPUs, so the two never fuse
        return ray.data.read_datasource(queue_datasource(self.queue, tasks), override_num_blocks=tasks, num_cpus=0)

    def static(self, block_rows: int):
        """Everything put so far as a Dataset of Arrow blocks, with no queue actor or read tasks to
        start: for a run whose whole plan is known before the graph starts (a listing that ended:
        local folders, manifests, inventories, small prefixes). The feed's two long-lived tasks and
        its actor cost such a run ~3 worker processes (bench/cpu_side.py)."""
        import ray.data

        with self.cond:
            rows, self.waiting, self.backlog = list(self.waiting), deque(), 0
            self.cond.notify_all()
        # copies (take), not slices: a pickled slice can carry its parent's whole buffers
        blocks = [r.take(pa.array(range(i, min(i + block_rows, r.num_rows)), pa.int64()))
                  for r in rows for i in range(0, r.num_rows, block_rows)]
        self.blocks = len(blocks)
        self.first_block_at = time.perf_counter()
        self.on_first()
        return ray.data.from_arrow(blocks)

    def stop(self) -> None:
        """Ends the queue actor (a run that failed; once): the thread's pending put fails and it exits."""
        self.close()
        if self.queue is not None:
            import ray

            queue, self.queue = self.queue, None
            ray.kill(queue.actor)

    def _loop(self, block_rows: int, tasks: int) -> None:
        queue = self.queue  # (`stop` lets go of it)
        try:
            for block in self._blocks(block_rows):
                queue.put(block)
                with self.cond:
                    self.backlog -= block.num_rows
                    self.cond.notify_all()
                self.blocks += 1
                if self.first_block_at is None:
                    self.first_block_at = time.perf_counter()
                    self.on_first()
            for _ in range(tasks):
                queue.put(None)  # each read task ends at one
        except BaseException as e:  # noqa: BLE001 - the driver reads it after the graph
            self.error = e

    def _blocks(self, block_rows: int) -> Iterator[pa.Table]:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if not self.waiting:
                    return
                rows = self.waiting.popleft()
            # copies (take), not slices: a pickled slice can carry its parent's whole buffers
            for i in range(0, rows.num_rows, block_rows):
                yield rows.take(pa.array(range(i, min(i + block_rows, rows.num_rows)), pa.int64()))


def _pull(queue: Any) -> Iterator[pa.Table]:
    while (block := queue.get()) is not None:
        yield block


FEED_OP = "ReadFeedQueue"  # the read operator's name in the graph (Ray Data: "Read" + the datasource's name)


def _unshaped_feed_rule() -> Any:
    """A physical-plan rule (Ray Data's DeveloperAPI `get_physical_ruleset`) that lets the feed's
    read tasks hand each block downstream as they yield it.

    Ray Data shapes every task's output into blocks of `target_max_block_size` (128 MiB): a task
    that yields small blocks and runs for the whole job would hand over nothing until it ends. The
    feed's blocks are already sized (`block_rows` images), so its read operator's shaping is off
    (`disable_block_shaping`: a block out per block in); every other operator keeps its own."""
    from ray.data._internal.logical.interfaces import Rule
    from ray.data._internal.output_buffer import OutputBlockSizeOption

    class UnshapedFeed(Rule):
        def apply(self, plan: Any) -> Any:
            ops, seen = [plan.dag], set()
            while ops:
                op = ops.pop()
                if id(op) in seen:
                    continue
                seen.add(id(op))
                ops += op.input_dependencies
                if op.name.endswith(FEED_OP) and hasattr(op, "_map_transformer"):
                    for fn in op._map_transformer.get_transform_fns():
                        fn._output_block_size_option = OutputBlockSizeOption.of(disable_block_shaping=True)
            return plan

    return UnshapedFeed


_RULE: list[Any] = []


def _install_rule() -> None:
    """Adds the rule to this process's physical ruleset, once."""
    if not _RULE:
        from ray.data._internal.logical.optimizers import get_physical_ruleset

        _RULE.append(_unshaped_feed_rule())
        get_physical_ruleset().add(_RULE[0])


def queue_datasource(queue: Any, tasks: int) -> Any:
    """A Datasource of `tasks` read tasks, each yielding the queue's blocks until it gets None
    (defined here so that importing this module does not import Ray)."""
    from functools import partial

    from ray.data import Datasource
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    class FeedQueueDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(partial(_pull, queue), meta, schema=ROWS_SCHEMA) for _ in range(tasks)]

    return FeedQueueDatasource()
