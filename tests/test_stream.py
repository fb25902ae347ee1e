"""Planning part by part while the input is listed (pipeline/planning/parts.py, pipeline/planning/stream.py,
pipeline/stages/feed.py): parts classified one by one give the plan of the whole listing; a listing
interrupted after any part resumes from its snapshot to the same listing; the feed hands rows
over in order; the table's file swaps reach images whose part is planned later."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from pipeline.stages.feed import Feed
from pipeline.planning.parts import ListingPart, listing_parts, read_parts, write_part
from pipeline.planning.plan import Classifier
from pipeline.tables.store import OutputStore
from pipeline.planning.sources import Listing
from pipeline.tables.delta import Replacements
from pipeline.tables.files import FILE_COLUMN


def _state() -> pa.Table:
    """Rows of a table: ok, error and retry images, some whose objects changed since."""
    rows = [("a01", "ok", "e1", 1, "f1"), ("a02", "ok", "e2", 2, "f1"), ("a03", "error", "e3", 3, "f2"),
            ("a04", "retry", "e4", 4, "f2"), ("a05", "ok", "OLD", 5, "f3"), ("a06", "error", "e6", 99, "f3"),
            ("gone1", "ok", "x", 1, "f4"), ("gone2", "retry", "x", 1, "f1"), ("a09", "ok", None, None, "f4")]
    cols = list(zip(*rows))
    return pa.table({"image_id": pa.array(cols[0]), "status": pa.array(cols[1]), "etag": pa.array(cols[2]),
                     "size": pa.array(cols[3], pa.int64()), FILE_COLUMN: pa.array(cols[4])})


def _listing() -> Listing:
    ids = [f"a{i:02d}" for i in range(1, 21)]
    etags = [f"e{i}" for i in range(1, 21)]
    etags[8] = None  # a09: no version known (a manifest), as its row
    sizes = [i for i in range(1, 21)]
    sizes[8] = None
    return Listing.build(ids, [f"s3://b/{i}" for i in ids], "", etags, sizes)


def _expected(listing: Listing, state: pa.Table) -> dict:
    """The plan worked out row by row in Python (the reference)."""
    rows = {r["image_id"]: r for r in state.to_pylist()}
    out = {"new": [], "done": [], "changed": [], "retry": []}
    for it in listing:
        r = rows.get(it.image_id)
        if r is None:
            out["new"].append(it.image_id)
        elif r["status"] == "retry":
            out["retry"].append(it.image_id)
        elif (r["etag"], r["size"]) == (it.etag, it.size):
            out["done"].append(it.image_id)
        else:
            out["changed"].append(it.image_id)
    listed = {it.image_id for it in listing}
    out["vanished"] = [i for i in rows if i not in listed]
    out["pending"] = [it.image_id for it in listing if it.image_id not in out["done"]]
    out["holders"] = {i: rows[i][FILE_COLUMN] for i in out["changed"] + out["retry"]}
    return out


@pytest.mark.parametrize("seed", range(6))
def test_parts_classified_one_by_one_plan_as_the_whole_listing(seed: int) -> None:
    rng = random.Random(seed)
    listing, state = _listing(), _state()
    state = state.take(pa.array(rng.sample(range(state.num_rows), state.num_rows)))  # a table's rows: any order
    expected = _expected(listing, state)
    cuts = sorted(rng.sample(range(1, len(listing)), rng.randint(0, 6)))
    bounds = [0, *cuts, len(listing)]
    classifier = Classifier(state)
    pending, counts, holders, changed, retry = [], {}, {}, [], []
    for a, b in zip(bounds, bounds[1:]):
        part = classifier.part(listing.take(pa.array(range(a, b), pa.int64())))
        pending += part.pending.image_ids.to_pylist()
        counts = {k: counts.get(k, 0) + v for k, v in part.counts.items()}
        holders.update(part.holders)
        changed += part.changed
        retry += part.retry
    assert pending == expected["pending"]
    assert counts == {"listed": 20, "done": len(expected["done"]), "new": len(expected["new"]),
                      "changed": len(expected["changed"]), "to_retry": len(expected["retry"])}
    assert changed == expected["changed"] and retry == expected["retry"] and holders == expected["holders"]
    assert sorted(classifier.vanished().to_pylist()) == sorted(expected["vanished"])
    assert classifier.holders(classifier.vanished()) == {"gone1": "f4", "gone2": "f1"}
    backwards = Classifier(state).part(listing.take(pa.array(range(len(listing) - 1, -1, -1), pa.int64())))
    assert backwards.counts == {"listed": 20, "done": len(expected["done"]), "new": len(expected["new"]),
                                "changed": len(expected["changed"]), "to_retry": len(expected["retry"])}


def test_replacements_added_after_a_swap_point_at_the_rewrite() -> None:
    """A part planned after a commit rewrote a file names the file the plan read: its images are
    taken from the rewrite (twice swapped: the last one)."""
    r = Replacements({"a": "f1"})
    drops = r.take(["a"])
    assert drops == {"f1": ["a"]}
    r.swapped(drops, [("f1", {"path": "f1b"})])
    r.add({"b": "f1"})
    drops = r.take(["b"])
    assert drops == {"f1b": ["b"]}
    r.add({"c": "f1"}, prune=["c"])  # added while b's commit is in flight
    r.swapped(drops, [("f1b", {"path": "f1c"})])
    assert r.take([]) == {"f1c": ["c"]} and r.pending_prune()


def test_the_feed_hands_rows_over_in_order_in_blocks() -> None:
    feed = Feed()
    tables = [pa.table({"image_id": [f"{p}-{i}" for i in range(n)], "uri": ["u"] * n, "shard_id": ["s"] * n})
              for p, n in enumerate((5, 1, 0, 7))]
    for t in tables:
        feed.put(t)
    feed.close()
    blocks = list(feed._blocks(3))
    assert [b.num_rows for b in blocks] == [3, 2, 1, 3, 3, 1]
    assert pa.concat_tables(blocks).column("image_id").to_pylist() == \
        [i for t in tables for i in t.column("image_id").to_pylist()]


def test_local_inputs_are_one_part_and_read_back(tmp_path) -> None:
    from segment_helpers import write_images

    write_images(tmp_path / "in", ["b.png", "a.png", "sub/c.png"])
    parts = list(listing_parts(str(tmp_path / "in"), None, None))
    assert len(parts) == 1 and parts[0].last and parts[0].listing.image_ids.to_pylist() == ["a.png", "b.png", "sub/c.png"]
    store = OutputStore(str(tmp_path / "out"))
    write_part(store, "_runs/r/listing", parts[0])
    back = read_parts(store, "_runs/r/listing")
    assert len(back) == 1 and back[0].last and back[0].snapshotted
    assert back[0].listing.to_table().equals(parts[0].listing.to_table())
    assert list(listing_parts(str(tmp_path / "in"), None, None, back)) == back  # nothing listed again
    # a run of the previous layout left one listing.parquet: it reads back as the whole, last part
    from ifcn.io import put_atomic
    from pipeline.tables.parquet_io import parquet_bytes

    put_atomic(store.fs, store.path("_runs/old/listing.parquet"), parquet_bytes(parts[0].listing.to_table(), None))
    legacy = read_parts(store, "_runs/old/listing.parquet")
    assert len(legacy) == 1 and legacy[0].last and legacy[0].listing.to_table().equals(parts[0].listing.to_table())
    assert read_parts(store, "_runs/none/listing.parquet") == [] and read_parts(store, "_runs/none/listing") == []


@pytest.mark.slow
def test_a_listing_interrupted_after_any_part_resumes_to_the_same_listing(s3_bucket, tmp_path, monkeypatch) -> None:
    """Parts of one key (pages of one key: an interruption at any page) snapshotted up to part k,
    then the listing continued from the snapshot: the same parts' rows as an uninterrupted listing,
    the first k read back, the rest listed after them; a part that does not follow its
    predecessor (a stale writer's) ends what is trusted."""
    import s3fs

    from pipeline.planning import listing as listing_module
    from pipeline.planning import parts as parts_module

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = s3_bucket.removeprefix("s3://")
    keys = [f"images/{k}" for k in ("a.jpg", "b/c.png", "b/d.txt", "e f.jpg", "ü.png", "z/1.jpg", "z/2.jpg")]
    fs.pipe({f"{bucket}/{k}": k.encode() for k in keys})
    url = f"{s3_bucket}/images/"
    monkeypatch.setattr(listing_module, "PAGE_SIZE", 1)  # one key a page, one page a part: every page
    monkeypatch.setattr(listing_module, "LIST_CONCURRENCY", 1)
    whole = list(listing_parts(url, None, None, part_rows=0))
    rows = [r for p in whole for r in p.listing.to_table().to_pylist()]
    assert [r["image_id"] for r in rows] == ["a.jpg", "b/c.png", "e f.jpg", "z/1.jpg", "z/2.jpg", "ü.png"]
    assert len(whole) == len(keys)  # part_rows 0: a part per page (the .txt key's is empty)
    store = OutputStore(str(tmp_path / "out"))
    for k in range(len(whole) + 1):
        folder = f"_runs/r{k}/listing"
        for part in whole[:k]:
            write_part(store, folder, part)
        resumed = read_parts(store, folder)
        assert len(resumed) == k
        again = list(listing_parts(url, None, None, resumed, part_rows=0))
        assert [r for p in again for r in p.listing.to_table().to_pylist()] == rows, k
        assert [p.snapshotted for p in again] == [True] * k + [False] * (len(again) - k)
        assert all(a.until == b.after for a, b in zip(again, again[1:])) and again[-1].last
    # read back, a part holds its footer only: the rows of a part are read when it is planned, and
    # continuing the listing reads only the last non-empty part's (its last key)
    reads: list[str] = []
    real = parts_module._read_part
    monkeypatch.setattr(parts_module, "_read_part", lambda fs, path: reads.append(path) or real(fs, path))
    resumed = read_parts(store, f"_runs/r{len(whole) - 1}/listing")
    assert reads == [] and [len(p) for p in resumed] == [len(p.listing) for p in whole[:-1]]
    assert len(list(listing_parts(url, None, None, resumed, part_rows=0))) == len(whole) and len(reads) == 1
    folder = "_runs/stale/listing"
    write_part(store, folder, whole[0])
    write_part(store, folder, ListingPart(1, whole[2].listing, whole[2].after, whole[2].until))  # skips part 1
    assert len(read_parts(store, folder)) == 1
