"""The Delta commit protocol without Ray: workers' data files, the driver's group commits (one
commit per group, replaced images' old rows leaving in it), app transactions, fencing, a real
SIGKILL of a child process before and after every commit, prune and overwrite, checkpoints, and
readers that refuse a damaged or swapped file. Tables are read back with deltalake's own reader,
at every version a reader could have opened."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from pipeline.tables.check import check_output
from pipeline.commit import GroupCommitter, InlinePublisher, ShardCollector
from pipeline.tables.schema import REDUCED_SCHEMA
from pipeline.stages.sink import StageWriter
from pipeline.planning.sources import Listing
from pipeline.tables.delta import CHECKPOINT_EVERY, KILL_ENV, LEASE_APP, LeaseLostError, OutputTables, Replacements
from pipeline.tables.files import TableDamagedError
from segment_helpers import REPO, delta_options

IDS = [f"img{i}" for i in range(6)]  # 3 shards of 2
SETTINGS = {"format": "test", "checkpoint_sha256": "0" * 64, "settings": {}}


def _count(image_id: str, salt: int) -> int:
    """How many proposals image `image_id` gets in a run of generation `salt` (changes with it)."""
    return 1 + (ord(image_id[-1]) + salt) % 3


def _row(image_id: str, shard_id: str, proposals: int, salt: int = 0) -> dict:
    return {"image_id": image_id, "uri": f"file:///{image_id}", "width": 8, "height": 8, "status": "ok", "error": None,
            "num_proposals": proposals, "read_ms": 1.0, "decode_ms": 1.0, "infer_ms": 1.0, "postprocess_ms": 1.0,
            "shard_id": shard_id, "proposals": [{"rank": k, "score": 1.0 - k / 10, "bbox": [0.0, 0.0, 1.0, 1.0],
                                                 "area": 1, "rle": f"{image_id}-{salt}-{k}", "scale": 64}
                                                for k in range(proposals)]}


def commit_all(out: str, run_id: str, ids: list[str] = IDS, salt: int = 0, prune: list[str] = (),
               overwrite: bool = False) -> None:
    """One run over `ids` as the driver makes it: fence (or overwrite), then one commit per shard
    of 2 that also drops the old rows of any of its images the table holds, a prune carried by the
    first commit (or its own), and the end record. The kill hook in KILL_ENV may end this
    process at any step."""
    tables = OutputTables(out)
    tables.fence({"run_id": run_id, "started_at": run_id}, SETTINGS, overwrite=overwrite)
    state = tables.images_state(["image_id"], with_files=True).to_pydict()
    held = dict(zip(state["image_id"], state["__filename"]))
    holders = {i: held[i] for i in [*ids, *prune] if i in held}
    listing = Listing.build(ids, [f"file:///{i}" for i in ids])
    spans = listing.spans(2)
    publisher = InlinePublisher(out, None, run_id)
    collector = ShardCollector(spans, listing, publisher)
    committer = GroupCommitter(tables, run_id, {"run_id": run_id, "started_at": run_id}, Replacements(holders, prune),
                               lambda _: None, max_shards=1)
    committer.rewriter = publisher
    stage = StageWriter(out, None, run_id)
    for span in spans:
        rows = [_row(i, span.shard_id, _count(i, salt), salt) for i in ids[span.start:span.stop]]
        collector.add(stage(pa.Table.from_pylist(rows, schema=REDUCED_SCHEMA)))
        committer.add(collector.take())
    committer.prune()
    committer.finish(complete=True, finished_listing=True, exit="done")


def _child(out: str, run_id: str, kill_at: str | None, **kw) -> int:
    code = f"import test_table; test_table.commit_all({out!r}, {run_id!r}, **{kw!r})"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode


def _copy(src: str, dst: str) -> None:
    """A whole output (table, staging files) to a new place: one run's state shared by several kill
    steps, each of which then writes its own copy (the log's paths are relative to the table)."""
    if "://" not in src:
        shutil.copytree(src, dst)
        return
    import fsspec

    fs = fsspec.filesystem(src.split("://", 1)[0], skip_instance_cache=True)
    fs.copy(src.split("://", 1)[1], dst.split("://", 1)[1], recursive=True)


def _uri(out: str) -> str:
    return f"{out if '://' in out else os.path.abspath(out)}/segments"


def _table(out: str, version: int | None = None) -> pd.DataFrame:
    """The whole table at `version` by deltalake's reader, one row per image, sorted."""
    dt = DeltaTable(_uri(out), version=version, storage_options=delta_options(out))
    return dt.to_pyarrow_dataset().to_table().to_pandas().sort_values("image_id").reset_index(drop=True)


def _exists(out: str) -> bool:
    return DeltaTable.is_deltatable(_uri(out), storage_options=delta_options(out))


def _facts(df: pd.DataFrame) -> list[tuple]:
    """What must equal a from-scratch run: each image, its status and its proposals' strings."""
    return [(r.image_id, r.status, r.num_proposals, [p["rle"] for p in r.proposals]) for r in df.itertuples()]


def _assert_every_version_whole(out: str) -> None:
    """At every version a reader could open: one row per image, and each row whole (its
    proposals count, ranks 0..n-1, all from one run)."""
    if not _exists(out):
        return
    latest = DeltaTable(_uri(out), storage_options=delta_options(out)).version()
    for version in range(latest + 1):
        df = _table(out, version)
        assert not df.image_id.duplicated().any(), f"version {version}: an image has two rows"
        for r in df.itertuples():
            assert len(r.proposals) == r.num_proposals, (version, r.image_id)
            assert [p["rank"] for p in r.proposals] == list(range(r.num_proposals))
            assert len({p["rle"].split("-")[1] for p in r.proposals}) <= 1, (version, r.image_id)  # one run's rows


def test_group_commits_are_single_idempotent_commits(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit_all(out, "r1")
    df = _table(out)
    assert df.image_id.tolist() == IDS and df.num_proposals.tolist() == [_count(i, 0) for i in IDS]
    dt = DeltaTable(_uri(out))
    # fence + 3 group commits + the end record, each one commit
    assert dt.version() == 4 and dt.transaction_version("r1") == 4 and dt.transaction_version(LEASE_APP) == 1
    history = dt.history()
    assert history[0]["ifcn.run"]["exit"] == "done"
    assert [len(DeltaTable(_uri(out), version=v).file_uris()) for v in range(5)] == [0, 1, 2, 3, 3]
    # a re-sent group commit (same app transaction) adds nothing
    tables = OutputTables(out)
    tables.generation = 1
    fake = {"path": "part-x.parquet", "size": 1, "modification_time": 0, "stats": "{}"}
    assert tables.commit_group("r1", 2, [fake], [], {"run_id": "r1"}) is False
    assert DeltaTable(_uri(out)).version() == 4 and _facts(_table(out)) == _facts(df)
    _assert_every_version_whole(out)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_kill_before_and_after_every_commit_then_rerun_gives_the_uninterrupted_rows(
        store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A second run re-processes 4 images whose objects changed (two of them share an old file
    with an image that stays) and prunes one: a real SIGKILL before and after each of its commits
    (fence, the 3 groups, the end record), then the same run again: the rows equal a run never
    killed, and no version ever showed an image twice or in part."""
    base = f"{request.getfixturevalue('s3_bucket')}/t" if store == "s3" else str(tmp_path)
    first, changed, prune = IDS[:5], ["img0", "img2", "img4", "img5"], ["img3"]
    before = f"{base}/first"  # the first run, never killed: every output below starts as a copy of it
    commit_all(before, "r1", ids=first)
    reference = f"{base}/reference"
    _copy(before, reference)
    assert _child(reference, "r2", None, ids=changed, salt=1, prune=prune) == 0
    want = _facts(_table(reference))
    assert [f[0] for f in want] == ["img0", "img1", "img2", "img4", "img5"]
    steps = [f"{when}_{what}:{n}" for what, ns in (("fence", [1]), ("group", [1, 2]), ("record", [1]))
             for n in ns for when in ("before", "after")]
    for step in steps:
        out = f"{base}/{step.replace(':', '-')}"
        _copy(before, out)
        assert _child(out, "r2", step, ids=changed, salt=1, prune=prune) == -9, step
        _assert_every_version_whole(out)  # what a kill leaves already holds the invariant
        # the next run plans from the table: the images still holding their first run's rows
        df = _table(out)
        redo = sorted(set(changed) - {r.image_id for r in df.itertuples() if len(r.proposals)
                                      and r.proposals[0]["rle"].endswith("-1-0")})
        assert _child(out, "r3", None, ids=redo, salt=1, prune=[i for i in prune if i in set(df.image_id)]) == 0
        _assert_every_version_whole(out)
        assert _facts(_table(out)) == want, step
        assert check_output(out, delta_options(out)).damaged == (), step


def test_replaced_images_leave_in_the_commit_that_adds_them(tmp_path: Path) -> None:
    """Two images of one old file replaced in two different groups: each commit swaps the file
    its predecessor left, and the image that stays keeps its row throughout."""
    out = str(tmp_path / "out")
    commit_all(out, "r1", ["a1", "a2", "a3"])  # shards (a1, a2), (a3)
    commit_all(out, "r2", ["a1", "a3"], salt=1)  # group 1 replaces a1 (file of a1+a2), group... a3 alone
    commit_all(out, "r3", ["a2"], salt=2)  # the rewritten file of a2
    df = _table(out)
    assert [(r.image_id, r.proposals[0]["rle"].split("-")[1]) for r in df.itertuples()] == [
        ("a1", "1"), ("a2", "2"), ("a3", "1")]
    _assert_every_version_whole(out)
    dt = DeltaTable(_uri(out))
    for version in range(dt.version() + 1):  # a2 is visible at every version after the first commit
        ids = set(_table(out, version).image_id)
        assert version < 2 or "a2" in ids


def test_overwrite_is_one_commit_and_killed_either_side_reruns_clean(tmp_path: Path) -> None:
    """--overwrite after a killed run: the new version holds only the new run's rows (nothing
    rolled forward into it); the old rows stay readable by version."""
    out, reference, killed = str(tmp_path / "out"), str(tmp_path / "ref"), str(tmp_path / "killed")
    commit_all(reference, "n1", IDS[:4], salt=2)
    assert _child(killed, "old", "after_group:2") == -9  # a run killed mid-way: each step starts from a copy
    for step in ("before_overwrite:1", "after_overwrite:1", "after_group:1"):
        shutil.rmtree(out, ignore_errors=True)
        _copy(killed, out)
        assert _child(out, "new", step, ids=IDS[:4], salt=2, overwrite=True) == -9
        _assert_every_version_whole(out)
        assert _child(out, "new2", None, ids=IDS[:4], salt=2, overwrite=True) == 0
        assert _facts(_table(out)) == _facts(_table(reference)), step
        assert check_output(out).damaged == ()
        assert len(_table(out, 2)) == 4  # the killed run's rows, by version


def test_a_run_that_lost_its_lease_cannot_commit_even_paused_after_its_checks(tmp_path: Path) -> None:
    """Run A passes every check, then pauses right before its commit; run B takes the output over
    (its fence commit) in that pause. A's commit fails without adding a row, and A stops."""
    out = str(tmp_path / "out")
    commit_all(out, "r1", IDS[:2])
    a = OutputTables(out)
    a.fence({"run_id": "A"}, SETTINGS)
    b = OutputTables(out)
    a.before_commit = lambda: b.fence({"run_id": "B"}, SETTINGS)  # the pause: B takes over exactly here
    before = DeltaTable(_uri(out)).version()
    fake = {"path": "part-x.parquet", "size": 1, "modification_time": 0, "stats": json.dumps({"numRecords": 1})}
    with pytest.raises(LeaseLostError, match="another run took this output over"):
        a.commit_group("A", 1, [fake], [], {"run_id": "A"})
    assert DeltaTable(_uri(out)).version() == before + 1  # B's fence commit only
    # and a stale handle that reads the table after the takeover is refused before it tries
    a.before_commit = lambda: None
    with pytest.raises(LeaseLostError):
        a.commit_group("A", 1, [fake], [], {"run_id": "A"})
    assert DeltaTable(_uri(out)).transaction_version(LEASE_APP) == b.generation == a.generation + 1


def test_checkpoints_keep_the_log_short(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    tables = OutputTables(out)
    tables.fence({"run_id": "r"}, SETTINGS)
    for v in range(1, CHECKPOINT_EVERY + 1):
        tables.record("r", v, {"run_id": "r", "counts": {}})
    log = Path(out) / "segments" / "_delta_log"
    assert (log / f"{CHECKPOINT_EVERY:020d}.checkpoint.parquet").exists()
    assert json.loads((log / "_last_checkpoint").read_text())["version"] == CHECKPOINT_EVERY
    assert tables.open().transaction_version("r") == CHECKPOINT_EVERY


def test_transient_failures_are_committed_as_retry_rows_and_planned_again(tmp_path: Path) -> None:
    """An image whose read kept failing no longer holds its shard back: it is a 'retry' row with
    its reason, its shard-mates are committed, and the next plan redoes exactly it, replacing its
    row in the commit that adds the new one."""
    from pipeline.config import SegmentConfig
    from pipeline.errors import RETRY
    from pipeline.planning.plan import Plan, _classified

    out = str(tmp_path / "out")
    listing = Listing.build(["a", "b"], ["file:///a", "file:///b"])
    publisher = InlinePublisher(out, None, "r1")
    collector = ShardCollector(listing.spans(2), listing, publisher)
    retry = {**_row("b", "000000", 0), "status": RETRY, "error": "image b: reading failed 5 times (Timeout)"}
    collector.add(StageWriter(out, None, "r1")(pa.Table.from_pylist([_row("a", "000000", 2), retry],
                                                                    schema=REDUCED_SCHEMA)))
    tables = OutputTables(out)
    tables.fence({"run_id": "r1"}, SETTINGS)
    committer = GroupCommitter(tables, "r1", {"run_id": "r1"}, Replacements({}), lambda _: None)
    committer.add(collector.take())
    committer.flush()
    df = _table(out)
    assert df.status.tolist() == ["ok", "retry"] and df.error[1] == retry["error"]
    assert committer.counts["num_retry"] == 1 and df.num_proposals.tolist() == [2, 0]
    config = SegmentConfig(input=str(tmp_path / "in"), output=out, checkpoint="m.pt", shard_size=4)
    plan = Plan("r2", listing, "", None, {}, listing, [], {}, [], [], [], {}, None, OutputTables(out), SETTINGS,
                "", {})
    plan = _classified(plan, config)
    assert plan.counts == {"listed": 2, "done": 1, "new": 0, "changed": 0, "to_retry": 1, "vanished": 0}
    assert plan.pending.image_ids.to_pylist() == ["b"] and plan.retry == ["b"]
    assert plan.holders == {"b": DeltaTable(_uri(out)).get_add_actions(flatten=True).column("path")[0].as_py()}
    commit_all(out, "r2", ["b"], salt=1)
    assert _table(out).status.tolist() == ["ok", "ok"]
    _assert_every_version_whole(out)


def test_publishing_rides_out_a_short_storage_outage(s3_server, s3_bucket: str) -> None:
    """The endpoint refuses connections for 6 s while a shard is published: the publish call
    backs off and writes its data file once the endpoint is back (no Ray retry, no failed run)."""
    import threading
    import time

    import s3fs

    from fixtures_infra import TcpProxy
    from pipeline.stages.sink import Fragment

    proxy = TcpProxy(s3_server.endpoint.removeprefix("http://"))
    # botocore's retries off; s3fs's own (~2 s of backoff) are shorter than the outage, so what
    # rides it out is the project's backoff
    so = {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True,
          "config_kwargs": {"retries": {"max_attempts": 1}}}
    out = f"{s3_bucket}/out"
    listing = Listing.build(["a", "b"], ["file:///a", "file:///b"])
    shard = listing.shard(listing.spans(2)[0])
    meta = StageWriter(out, so, "r1")(pa.Table.from_pylist([_row("a", "000000", 1), _row("b", "000000", 1)],
                                                          schema=REDUCED_SCHEMA)).to_pylist()[0]
    publisher = InlinePublisher(out, so, "r1")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # straight to moto
    proxy.down()
    try:
        worker = threading.Thread(target=publisher.submit, args=(shard, [Fragment(meta["path"], ("a", "b"))]))
        worker.start()
        time.sleep(6)
        assert worker.is_alive() and not fs.exists(f"{out}/segments")
    finally:
        proxy.up()
    worker.join(timeout=60)
    assert not worker.is_alive()
    result, = publisher.poll()
    assert result["shard_id"] == "000000" and result["num_images"] == 2 and result["image_ids"] == ["a", "b"]
    assert fs.info(f"{out}/segments/{result['file']['path']}")["size"] == result["file"]["size"]


def _hand_made_table(tmp_path: Path) -> DeltaTable:
    """Three files of known image_id ranges plus one without statistics."""
    from deltalake import Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    import pyarrow.parquet as pq

    from pipeline.tables.schema import SEGMENTS_SCHEMA
    from pipeline.tables.files import file_stats

    root = tmp_path / "out" / "segments"
    root.mkdir(parents=True)
    adds = []
    for n, ids in enumerate((["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["x"])):
        rows = [{**dict.fromkeys(SEGMENTS_SCHEMA.names), "image_id": i, "uri": f"file:///{i}", "status": "ok",
                 "num_proposals": 1, "shard_id": f"{n:06d}", "run_id": "r",
                 "proposals": [{"rank": 0, "score": 0.5, "bbox": [0, 0, 1, 1], "area": 1, "rle": i, "scale": 8}]}
                for i in ids]
        t = pa.Table.from_pylist(rows, SEGMENTS_SCHEMA)
        pq.write_table(t, root / f"part-{n}.parquet")
        stats = file_stats(t) if ids != ["x"] else json.dumps({"numRecords": 1})
        adds.append(AddAction(f"part-{n}.parquet", (root / f"part-{n}.parquet").stat().st_size, {}, 0, True, stats))
    create_table_with_add_actions(str(root), Schema.from_arrow(SEGMENTS_SCHEMA), adds, mode="error")
    return DeltaTable(str(root))


def test_state_ranges_read_only_the_files_of_a_range(tmp_path: Path, monkeypatch) -> None:
    """Every range (after, until] of the planner's state holds exactly the rows of the whole state
    in it, sorted; it reads only the files whose id span meets it (and the one without stats)."""
    from pipeline.tables import files

    _hand_made_table(tmp_path)
    tables = OutputTables(str(tmp_path / "out"))
    whole = tables.images_state(with_files=True)
    whole = whole.take(pa.compute.sort_indices(whole.column("image_id")))
    state = tables.state_ranges()
    read: list[list[str]] = []
    real = files.read_verified
    monkeypatch.setattr(files, "read_verified",
                        lambda dt, dataset, cols, **kw: read.append(sorted(dataset.files)) or real(dt, dataset, cols, **kw))
    bounds = [None, "", "a", "b", "c", "cc", "f", "g", "i", "w", "x", "z"]
    for after in bounds:
        for until in bounds:
            if after is not None and until is not None and until < after:
                continue
            got = state.rows(after, until)
            want = [r for r in whole.to_pylist()
                    if (after is None or r["image_id"] > after) and (until is None or r["image_id"] <= until)]
            assert got.to_pylist() == want, (after, until)
    read.clear()
    state.rows("b", "e")
    assert read == [["part-0.parquet", "part-1.parquet", "part-3.parquet"]]  # a-c, d-f and the one without stats
    read.clear()
    state.rows("c", "f")
    assert read == [["part-1.parquet", "part-3.parquet"]]


def test_table_dataset_skips_files_by_image_id_statistics(tmp_path: Path) -> None:
    """`image_ids` keeps exactly the files whose [min, max] can hold one of them (and the one it
    cannot judge); rows equal deltalake's; the masks view is the proposals flattened."""
    from pipeline.tables.output import read_output, table_dataset
    from pipeline.tables.schema import IMAGES_SCHEMA

    dt = _hand_made_table(tmp_path)
    kept = lambda ids: sorted(f.rsplit("/", 1)[-1] for f in table_dataset(dt, "images", None, ids).files)  # noqa: E731
    assert kept(["e"]) == ["part-1.parquet", "part-3.parquet"]
    assert kept(["c", "g"]) == ["part-0.parquet", "part-2.parquet", "part-3.parquet"]
    assert kept(["cc", "zz"]) == ["part-3.parquet"]  # between and beyond every range: only the unjudged file
    assert kept([]) == ["part-3.parquet"]
    assert len(kept(None)) == 4
    whole = read_output(str(tmp_path / "out"), "images").sort_by("image_id")
    assert whole.equals(dt.to_pyarrow_table().select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA).sort_by("image_id"))
    one = read_output(str(tmp_path / "out"), "images", ["image_id", "shard_id"], image_ids=["e", "x"])
    assert one.sort_by("image_id").to_pylist() == [{"image_id": "e", "shard_id": "000001"},
                                                    {"image_id": "x", "shard_id": "000003"}]
    masks = read_output(str(tmp_path / "out"), "masks", ["image_id", "rle", "rank"])
    assert sorted(masks.to_pylist(), key=lambda r: r["image_id"]) == [
        {"image_id": i, "rle": i, "rank": 0} for i in "abcdefghix"]
    import pyarrow.dataset as pads
    assert read_output(str(tmp_path / "out"), "masks", ["image_id"], pads.field("rle") == "e").to_pylist() == [
        {"image_id": "e"}]  # a filter on a proposal's column


@pytest.mark.parametrize("damage", ["swapped", "truncated", "flipped", "deleted"])
def test_readers_and_planner_refuse_a_damaged_or_swapped_file(tmp_path: Path, damage: str) -> None:
    """A file copied over another, cut short, damaged in place (same size) or deleted: read_output
    and the planner's state read raise one line naming the file and jobs.check --repair."""
    from pipeline.tables.output import read_output

    _hand_made_table(tmp_path)
    root = tmp_path / "out" / "segments"
    victim = root / "part-1.parquet"
    if damage == "swapped":
        shutil.copy(root / "part-2.parquet", victim)  # same schema, same size: other images
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-40])
    elif damage == "flipped":
        data = bytearray(victim.read_bytes())
        data[40:56] = bytes(b ^ 0xFF for b in data[40:56])
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    for read in (lambda: read_output(str(tmp_path / "out"), "images"),
                 lambda: read_output(str(tmp_path / "out"), "masks"),
                 lambda: OutputTables(str(tmp_path / "out")).images_state(),
                 lambda: OutputTables(str(tmp_path / "out")).state_ranges().rows("c", "f")):  # part-1's range
        with pytest.raises(TableDamagedError) as e:
            read()
        assert "part-1.parquet" in str(e.value) and "jobs.check" in str(e.value) and "\n" not in str(e.value)
