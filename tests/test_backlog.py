"""The driver holds a few parts of a bucket, not the bucket (issue 22, item 3): the S3 listing runs
only a few parts ahead of the parts taken from it (pipeline/planning/listing.py `Pace`), and the
planner plans the next part only once the feed's backlog has room for it (pipeline/stages/feed.py
`wait_for_room`, pipeline/planning/stream.py). Either way the listing ends the same."""
from __future__ import annotations

import posixpath
import threading
import time
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline.planning import listing
from pipeline.planning.listing import Pace, S3Lister
from pipeline.planning.parts import ListingPart
from pipeline.planning.plan import Classifier
from pipeline.planning.sources import Listing
from pipeline.planning.stream import PlanStream
from pipeline.stages.feed import Feed
from pipeline.tables.delta import Replacements
from pipeline.tables.files import FILE_COLUMN

KEYS = 300


def _settled(value, quiet_s: float = 1.0, timeout_s: float = 60.0):
    """`value()` once it has not changed for `quiet_s` (the listing or planner stopped on its own)."""
    last, since, start = value(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.05)
        if (now := value()) != last:
            last, since = now, time.monotonic()
        assert time.monotonic() - start < timeout_s, "never settled"
    return last


@pytest.mark.slow
def test_the_listing_runs_only_a_few_parts_ahead_of_its_consumer(s3_bucket, monkeypatch) -> None:
    """A consumer that takes one part and stops: the keys listed (counted as each page's keys in
    its range become rows) stop within the pace's bound of rows, far below the prefix; taking the rest then gives exactly
    s3fs's own sorted listing, in parts that follow each other, for tight and loose paces."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = s3_bucket.removeprefix("s3://")
    names = [f"images/{d}/{i:04d}.jpg" for i in range(KEYS // 3) for d in ("a", "m", "z")]
    fs.pipe({f"{bucket}/{k}": b"x" for k in names + ["images/m/notes.txt", "images/q/"]})
    found = fs.find(f"{bucket}/images", withdirs=False, detail=True)
    reference = sorted((p.removeprefix(f"{bucket}/images/"), f"s3://{p}", info["ETag"].strip('"'), info["size"])
                       for p, info in found.items()
                       if not p.endswith("/") and posixpath.splitext(p)[1].lower() in listing.IMAGE_EXTENSIONS)
    assert len(reference) == KEYS
    listed = [0]
    real = listing._columns

    def counted(keys, *args):
        listed[0] += len(keys)
        return real(keys, *args)

    monkeypatch.setattr(listing, "_columns", counted)
    for concurrency, page_size, part_rows, ahead, queued in ((8, 5, 10, 20, 20), (32, 3, 4, 1, 1),
                                                              (4, 10, 20, 20, 20), (1, 10, 10, 10, 10)):
        listed[0] = 0
        parts = S3Lister(fs, concurrency, page_size).parts(f"{bucket}/images", part_rows=part_rows,
                                                           pace=Pace(ahead, queued))
        got = [next(parts)]
        held = _settled(lambda: listed[0]) - len(got[0])
        # rows past the frontier (a range parks once `ahead` rows lie between the frontier and it;
        # ranges cut off nearer the frontier later fill the gaps below parked ones: a few times
        # `ahead` at most, ~3.5x measured at 10M keys), one page in flight per range when it
        # crossed, emitted parts (queued and the one that crossed it), rows short of a part
        bound = 4 * ahead + concurrency * page_size + queued + 2 * part_rows
        assert held <= bound <= 0.7 * KEYS, (concurrency, page_size, held, bound)
        got += list(parts)
        rows = [row for p in got for row in zip(*(c.to_pylist() for c in p.columns))]
        assert rows == reference, (concurrency, page_size, part_rows)
        assert got[0].after == "" and got[-1].until is None
        assert all(a.until == b.after for a, b in zip(got, got[1:]))
        assert listed[0] == KEYS + 2  # each key listed once (the .txt and the folder's key are not images)


def _plan(parts: list[ListingPart], pulled: list[int]) -> SimpleNamespace:
    def gen():
        for p in parts:
            pulled[0] += 1
            yield p

    return SimpleNamespace(parts=gen(), store=None, listing_path="", skipped={})


class _Gate:
    """The feed's queue actor, standing in: takes a block only when the test opens the gate."""

    def __init__(self) -> None:
        self.opened, self.blocks, self.cond = 0, [], threading.Condition()

    def put(self, block) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.opened > len(self.blocks))
            self.blocks.append(block)

    def open(self, n: int) -> None:
        with self.cond:
            self.opened += n
            self.cond.notify_all()


def test_the_planner_plans_a_part_only_when_the_feed_has_room() -> None:
    """Parts of 10 new images, room below 15 rows, blocks of 5: two parts are planned, then the
    planner waits; each block the graph takes lets it plan the next part once the backlog is under
    15 rows; in the end every row reached the graph once, in order."""
    ids = [f"k{i:03d}" for i in range(60)]
    listing_ = Listing.build(ids, [f"s3://b/{i}" for i in ids], "", ["e"] * 60, [1] * 60)
    parts = [ListingPart(n, listing_.take(pa.array(range(10 * n, 10 * n + 10))), f"k{10 * n - 1:03d}" if n else "",
                         f"k{10 * n + 9:03d}" if n < 5 else None, True) for n in range(6)]
    state = pa.table({"image_id": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                      "etag": pa.array([], pa.string()), "size": pa.array([], pa.int64()),
                      FILE_COLUMN: pa.array([], pa.string())})
    feed, gate, pulled = Feed(), _Gate(), [0]
    feed.queue = gate
    threading.Thread(target=feed._loop, args=(5, 1), daemon=True).start()
    config = SimpleNamespace(shard_size=4, prune=False)
    handed: list[str] = []

    def on_shards(spans, pending) -> None:
        handed.extend(pending.image_ids.to_pylist())
        feed.put(pa.table({"image_id": pending.image_ids, "uri": pending.uris,
                           "shard_id": pa.array(["s"] * len(pending))}))

    stream = PlanStream(_plan(parts, pulled), config, Classifier(state), Replacements({}), {}, on_shards,
                        feed.close, lambda _: None, lambda: feed.wait_for_room(15)).start()
    assert _settled(lambda: (pulled[0], stream.parts)) == (2, 2)
    gate.open(1)  # 5 rows into the graph (held by the loop until the queue takes them): 15 wait
    assert _settled(lambda: (pulled[0], stream.parts)) == (2, 2) and feed.backlog == 15
    gate.open(1)  # 10 wait: room for the third part
    assert _settled(lambda: (pulled[0], stream.parts)) == (3, 3) and feed.backlog == 20
    gate.open(100)
    assert stream.ended.wait(30) and stream.error is None
    assert _settled(lambda: len(gate.blocks)) == 13  # 12 blocks of rows, the end marker
    rows = [i for b in gate.blocks[:-1] for i in b.column("image_id").to_pylist()]
    assert rows == ids == handed and gate.blocks[-1] is None and stream.pending == 60
