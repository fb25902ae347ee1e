"""The Delta commit protocol without Ray: workers' data files, the driver's group commits, app
transactions, roll-forward after a kill between the two tables' commits (a real SIGKILL of a
child process at each commit step), deletes of replaced rows, checkpoints. Tables are read back
with deltalake's own reader."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from pipeline.run import GroupCommitter, InlinePublisher, ShardCollector
from pipeline.schema import REDUCED_SCHEMA
from pipeline.sink import StageWriter
from pipeline.sources import Listing
from pipeline.table import CHECKPOINT_EVERY, KILL_ENV, OutputTables
from segment_helpers import REPO, delta_options

IDS = [f"img{i}" for i in range(6)]  # 3 shards of 2
SETTINGS = {"format": "test", "checkpoint_sha256": "0" * 64, "settings": {}}


def _row(image_id: str, shard_id: str, proposals: int) -> dict:
    return {"image_id": image_id, "uri": f"file:///{image_id}", "width": 8, "height": 8, "status": "ok", "error": None,
            "num_proposals": proposals, "read_ms": 1.0, "decode_ms": 1.0, "infer_ms": 1.0, "postprocess_ms": 1.0,
            "shard_id": shard_id, "proposals": [{"rank": k, "score": 1.0 - k / 10, "bbox": [0.0, 0.0, 1.0, 1.0],
                                                 "area": 1, "rle": f"{image_id}-{k}", "scale": 64}
                                                for k in range(proposals)]}


def commit_all(out: str, run_id: str, ids: list[str] = IDS) -> None:
    """One run's commits over `ids` with one shard per group, as the driver makes them (the
    kill hook in KILL_ENV may end this process at any step)."""
    listing = Listing.build(ids, [f"file:///{i}" for i in ids])
    spans = listing.spans(2)
    tables = OutputTables(out)
    collector = ShardCollector(spans, listing, InlinePublisher(out, None, run_id))
    committer = GroupCommitter(tables, run_id, {"run_id": run_id, "started_at": run_id}, SETTINGS, lambda _: None,
                               max_shards=1)
    stage = StageWriter(out, None, run_id)
    for span in spans:
        rows = [_row(i, span.shard_id, 1 + int(i[-1]) % 3) for i in ids[span.start:span.stop]]
        collector.add(stage(pa.Table.from_pylist(rows, schema=REDUCED_SCHEMA)))
        committer.add(collector.take())
    committer.finish(complete=True, finished_listing=True, exit="done")


def _child(out: str, run_id: str, kill_at: str | None) -> int:
    code = f"import test_table; test_table.commit_all({out!r}, {run_id!r})"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode


def _rows(out: str, name: str) -> pd.DataFrame:
    uri = out if "://" in out else os.path.abspath(out)
    dt = DeltaTable(f"{uri}/{name}", storage_options=delta_options(uri))
    keys = ["image_id", "rank"] if name == "masks" else ["image_id"]
    return dt.to_pyarrow_dataset().to_table().to_pandas().sort_values(keys).reset_index(drop=True)


def _exists(out: str, name: str) -> bool:
    uri = out if "://" in out else os.path.abspath(out)
    return DeltaTable.is_deltatable(f"{uri}/{name}", storage_options=delta_options(uri))


def _assert_invariant(out: str) -> None:
    """Every images row's masks rows are visible (same run, as many as num_proposals); no image
    has rows of two runs."""
    if not _exists(out, "images"):
        return
    images, masks = _rows(out, "images"), _rows(out, "masks") if _exists(out, "masks") else None
    assert not images.image_id.duplicated().any()
    for row in images.itertuples():
        mine = masks[masks.image_id == row.image_id]
        assert len(mine) == row.num_proposals and set(mine.run_id) <= {row.run_id}


def test_group_commits_are_idempotent_and_masks_come_first(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit_all(out, "r1")
    images, masks = _rows(out, "images"), _rows(out, "masks")
    assert images.image_id.tolist() == IDS and len(masks) == sum(1 + i % 3 for i in range(6))
    _assert_invariant(out)
    tables = OutputTables(out)
    for name in ("masks", "images"):
        assert tables.open(name).transaction_version("r1") == (3 if name == "masks" else 4)  # + the end record
    # a re-sent group commit (same app transaction) adds nothing
    results = [{"masks": {"path": "part-x.parquet", "size": 1, "modification_time": 0, "stats": "{}"},
                "images": {"path": "part-y.parquet", "size": 1, "modification_time": 0, "stats": "{}"}}]
    tables.commit_group("r1", 2, results, {"run_id": "r1"}, SETTINGS)
    assert _rows(out, "images").equals(images) and _rows(out, "masks").equals(masks)
    # every group commit: masks (naming the images files) before images, both with the run's record
    masks_history = DeltaTable(tables.uri("masks")).history()
    groups = [c["ifcn.group"] for c in masks_history if "ifcn.group" in c]
    assert sorted(g["version"] for g in groups) == [1, 2, 3] and all(len(g["images"]) == 1 for g in groups)
    images_history = DeltaTable(tables.uri("images")).history()
    assert images_history[0]["ifcn.run"]["exit"] == "done"
    for g in groups:
        masks_at = next(c["timestamp"] for c in masks_history if c.get("ifcn.group", {}).get("version") == g["version"])
        files = DeltaTable(tables.uri("images"), version=g["version"] - 1).file_uris()
        assert any(f.endswith(g["images"][0]["path"]) for f in files)
        images_at = next(c["timestamp"] for c in images_history if c.get("version") == g["version"] - 1)
        assert masks_at <= images_at


@pytest.mark.parametrize("store", ["local", "s3"])
def test_kill_at_every_commit_step_then_rerun_gives_the_uninterrupted_rows(store: str, tmp_path: Path,
                                                                           request: pytest.FixtureRequest) -> None:
    """A real SIGKILL before the masks commit, between the two, and after both (of group 2), each
    followed by a run that rolls forward and finishes: the same rows as a run never killed."""
    if store == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        base = f"{bucket}/t"
    else:
        base = str(tmp_path)
    reference = f"{base}/reference"
    assert _child(reference, "ref", None) == 0
    for step in ("before_masks", "between", "after_both"):
        out = f"{base}/{step}"
        assert _child(out, "r1", f"{step}:2") == -9
        _assert_invariant(out)  # what a kill leaves already holds the invariant
        masks = _rows(out, "masks")
        assert sorted(set(masks.shard_id)) == (["000000", "000001"] if step != "before_masks" else ["000000"])
        images = _rows(out, "images")
        assert sorted(set(images.shard_id)) == (["000000"] if step != "after_both" else ["000000", "000001"])
        tables = OutputTables(out)
        record = {"run_id": "r2", "started_at": "r2"}
        rolled = tables.roll_forward(record, SETTINGS)
        assert rolled == (1 if step == "between" else 0)
        _assert_invariant(out)
        assert tables.roll_forward(record, SETTINGS) == 0  # idempotent
        # the next run redoes what the images table lacks (planning: tests/test_pipeline.py)
        missing = sorted(set(IDS) - set(_rows(out, "images").image_id))
        if missing:
            commit_all(out, "r2", missing)
        _assert_invariant(out)
        for name in ("images", "masks"):
            got = _rows(out, name).drop(columns=["run_id", "shard_id", *(["read_ms"] if name == "images" else [])])
            want = _rows(reference, name).drop(columns=["run_id", "shard_id",
                                                        *(["read_ms"] if name == "images" else [])])
            pd.testing.assert_frame_equal(got, want, check_like=True)


def test_delete_images_removes_their_rows_from_both_tables(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit_all(out, "r1")
    tables = OutputTables(out)
    tables.delete_images(["img1", "it's"], ("images", "masks"), {"run_id": "r2"})
    assert "img1" not in set(_rows(out, "images").image_id) | set(_rows(out, "masks").image_id)
    assert len(_rows(out, "images")) == 5
    _assert_invariant(out)


def test_checkpoints_keep_the_log_short(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    tables = OutputTables(out)
    empty = {"run_id": "r", "counts": {}}
    for v in range(1, CHECKPOINT_EVERY + 2):
        tables.record("r", v, empty, SETTINGS)
    log = Path(out) / "images" / "_delta_log"
    assert (log / f"{CHECKPOINT_EVERY:020d}.checkpoint.parquet").exists()
    assert json.loads((log / "_last_checkpoint").read_text())["version"] == CHECKPOINT_EVERY
    assert tables.open("images").transaction_version("r") == CHECKPOINT_EVERY + 1


def test_transient_failures_are_committed_as_retry_rows_and_planned_again(tmp_path: Path) -> None:
    """An image whose read kept failing no longer holds its shard back: it is a 'retry' row with
    its reason, its shard-mates are committed, and the next plan redoes exactly it."""
    from pipeline.config import SegmentConfig
    from pipeline.errors import RETRY
    from pipeline.plan import Plan, _classified

    out = str(tmp_path / "out")
    listing = Listing.build(["a", "b"], ["file:///a", "file:///b"])
    collector = ShardCollector(listing.spans(2), listing, InlinePublisher(out, None, "r1"))
    retry = {**_row("b", "000000", 0), "status": RETRY, "error": "image b: reading failed 5 times (Timeout)"}
    collector.add(StageWriter(out, None, "r1")(pa.Table.from_pylist([_row("a", "000000", 2), retry],
                                                                    schema=REDUCED_SCHEMA)))
    committer = GroupCommitter(OutputTables(out), "r1", {"run_id": "r1"}, SETTINGS, lambda _: None)
    committer.add(collector.take())
    committer.flush()
    images = _rows(out, "images")
    assert images.status.tolist() == ["ok", "retry"] and images.error[1] == retry["error"]
    assert committer.counts["num_retry"] == 1 and len(_rows(out, "masks")) == 2
    config = SegmentConfig(input=str(tmp_path / "in"), output=out, checkpoint="m.pt", shard_size=4)
    plan = Plan("r2", listing, "", None, {}, listing, [], {}, [], [], [], None, OutputTables(out), SETTINGS, "", {})
    plan = _classified(plan, config)
    assert plan.counts == {"listed": 2, "done": 1, "new": 0, "changed": 0, "to_retry": 1, "vanished": 0}
    assert plan.pending.image_ids.to_pylist() == ["b"] and plan.retry == ["b"]


def test_publishing_rides_out_a_short_storage_outage(s3_server, s3_bucket: str) -> None:
    """The endpoint refuses connections for 6 s while a shard is published: the publish call
    backs off and writes its data files once the endpoint is back (no Ray retry, no failed run)."""
    import threading
    import time

    import s3fs

    from fixtures_infra import TcpProxy
    from pipeline.sink import Fragment

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
        assert worker.is_alive() and not fs.exists(f"{out}/images")
    finally:
        proxy.up()
    worker.join(timeout=60)
    assert not worker.is_alive()
    result, = publisher.poll()
    assert result["shard_id"] == "000000" and result["num_images"] == 2
    assert fs.info(f"{out}/images/{result['images']['path']}")["size"] == result["images"]["size"]


def test_table_dataset_skips_files_by_image_id_statistics(tmp_path: Path) -> None:
    """Three files of known image_id ranges plus one without statistics: `image_ids` keeps exactly the
    files whose [min, max] can hold one of them (and the one it cannot judge); rows equal deltalake's."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    import pyarrow.parquet as pq

    from pipeline.output import read_output, table_dataset
    from pipeline.schema import IMAGES_SCHEMA
    from pipeline.table import file_stats

    root = tmp_path / "out" / "images"
    root.mkdir(parents=True)
    adds = []
    for n, ids in enumerate((["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["x"])):
        t = pa.Table.from_pylist([{**dict.fromkeys(IMAGES_SCHEMA.names), "image_id": i, "uri": f"file:///{i}",
                                   "status": "ok", "shard_id": f"{n:06d}", "run_id": "r"} for i in ids], IMAGES_SCHEMA)
        pq.write_table(t, root / f"part-{n}.parquet")
        stats = file_stats(t) if ids != ["x"] else json.dumps({"numRecords": 1})
        adds.append(AddAction(f"part-{n}.parquet", (root / f"part-{n}.parquet").stat().st_size, {}, 0, True, stats))
    create_table_with_add_actions(str(root), Schema.from_arrow(IMAGES_SCHEMA), adds, mode="error")
    dt = DeltaTable(str(root))
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
