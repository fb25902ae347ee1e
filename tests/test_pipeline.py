"""End-to-end runs of the batch job on a real local Ray: results equal the in-process Predictor,
one images row per input, re-runs process only what changed in the bucket, Delta readers
(deltalake, polars, Ray, DuckDB, pycocotools) agree with the tables and never see an
uncommitted file, manifest inputs, the run history, and the CLI's one-line errors."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

import ifcn
from deltalake import DeltaTable
from pipeline.config import SegmentConfig, SegmentError
from ifcn.image import decode_image, read_bytes
from pipeline.stages.handoff import proposals_column
from pipeline.stages.infer import InferenceActor
from pipeline.stages.encode import encode_batch
from pipeline.graph import Resources, read_block_rows, resolve_resources, spread_actors
from pipeline.run import prepare, run_segment
from pipeline.tables.schema import IMAGES_SCHEMA, SEGMENTS_SCHEMA
from pipeline.stages.read import read_images
from segment_helpers import INFERENCE, cli, inference_flags, read_table, write_checkpoint, write_images

NAMES = ["a.jpg", "b.PNG", "c.jpeg", "nested/d.png", "nested/deeper/e.JPG"]
CORRUPT = "broken.jpg"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # num_gpus=0: the CPU path, compared exactly with a CPU Predictor even on a GPU machine
    # (tests/test_gpu.py runs GPU actors and compares across devices at the level that holds).
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("segment")
    folder = root / "images"
    write_images(folder, NAMES)
    (folder / CORRUPT).write_bytes(b"<html>403 Forbidden</html>")  # what a failed download saves as .jpg
    (folder / "notes.txt").write_text("not an image: not listed")
    return {"root": root, "images": folder, "checkpoint": write_checkpoint(root / "model.pt")}


def _config(inputs: dict, output: Path, **kw) -> SegmentConfig:
    return SegmentConfig.from_options(input=str(kw.pop("input", inputs["images"])), output=str(output),
                                      checkpoint=inputs["checkpoint"], **{"shard_size": 2, **INFERENCE, **kw})


@pytest.fixture(scope="module")
def first_run(ray_local, inputs: dict) -> dict:
    output = inputs["root"] / "out"
    summary = run_segment(_config(inputs, output))
    return {"output": output, "summary": summary}


def _reference(inputs: dict, uri: str) -> list[dict]:
    """The in-process Predictor on the image the job read (same decode, same config)."""
    model = ifcn.load_checkpoint(inputs["checkpoint"])
    predictor = ifcn.Predictor(model, ifcn.InferenceConfig(**INFERENCE), device="cpu")
    return predictor.predict(decode_image(read_bytes(uri, None), uri, 50_000_000, 16))


def test_masks_equal_in_process_predictor(first_run: dict, inputs: dict) -> None:
    masks = read_table(first_run["output"], "masks")
    images = read_table(first_run["output"], "images")
    ok = images[images.status == "ok"]
    assert len(ok) == len(NAMES)
    for row in ok.itertuples():
        ref = _reference(inputs, row.uri)
        got = masks[masks.image_id == row.image_id]
        assert len(ref) > 0 and len(got) == len(ref) == row.num_proposals, row.image_id
        assert got["rank"].tolist() == list(range(len(ref)))
        assert got["rle"].tolist() == [p["rle"]["counts"] for p in ref]
        # Actors run torch with their own thread count, which reorders float sums: last-bit differences.
        np.testing.assert_allclose(got["score"].to_numpy(), np.float32([p["score"] for p in ref]), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.stack(got["bbox"].to_numpy()), np.float32([p["bbox"] for p in ref]))
        assert got["area"].tolist() == [p["area"] for p in ref]
        assert got["scale"].tolist() == [p["scale"] for p in ref]
        assert set(got["height"]) == {row.height} and set(got["width"]) == {row.width}


def test_reducer_tasks_and_in_actor_postprocess_write_the_same_tables(first_run: dict, inputs: dict) -> None:
    """The GPU layout (actors -> reducer tasks) and the CPU default (postprocess in the actors)."""
    assert first_run["summary"]["postprocess"] == "actor"  # the CPU-only default
    output = inputs["root"] / "out-tasks"
    summary = run_segment(_config(inputs, output, postprocess="tasks"))
    assert summary["postprocess"] == "tasks"
    for table in ("masks", "images"):
        a = read_table(first_run["output"], table)
        b = read_table(output, table)
        cols = [c for c in a.columns if not c.endswith("_ms")]  # timings differ, facts must not
        pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


@pytest.mark.parametrize(("cluster", "kw", "want"), [
    ({"CPU": 2.0}, {}, Resources(2, 0.0, 0.75, True, 4)),  # one actor per core + room for a read task
    ({"CPU": 8.0}, {"postprocess": "tasks"}, Resources(4, 0.0, 1.0, False, 4)),
    ({"CPU": 16.0, "GPU": 4.0}, {}, Resources(4, 1.0, 1.0, False, 16)),  # GPUs: encoding tasks behind the actors
    ({"CPU": 16.0, "GPU": 4.0}, {"gpus_per_actor": 0.5, "batch_size": 8}, Resources(8, 0.5, 1.0, False, 8)),
    ({"CPU": 4.0}, {"actors": 1, "gpus_per_actor": 1.0}, Resources(1, 1.0, 1.0, False, 16)),  # autoscaler to come
    ({"CPU": 4.0}, {"actors": 2}, Resources(2, 0.0, 1.0, True, 4)),
    # 2 cores, 2 actors, encoding tasks: a read and an encoding task must fit beside the pool (it hung)
    ({"CPU": 2.0}, {"actors": 2, "postprocess": "tasks"}, Resources(2, 0.0, 0.25, False, 4)),
    # two 1-CPU nodes: 0.5 per actor, so a read task (0.5) fits beside an actor on either node
    ({"CPU": 2.0, "nodes": [1.0, 1.0]}, {"actors": 2}, Resources(2, 0.0, 0.5, True, 4)),
])
def test_resolve_resources(cluster: dict, kw: dict, want: Resources, inputs: dict, tmp_path: Path) -> None:
    cluster = dict(cluster)
    nodes = cluster.pop("nodes", None)
    assert resolve_resources(_config(inputs, tmp_path, **kw), cluster, nodes) == want


@pytest.mark.parametrize("res, nodes", [
    (Resources(2, 1.0, 1.0, False, 16), [8.0, 8.0]),  # GPU actors: the GPUs place them
    (Resources(2, 0.0, 0.75, True, 4), [2.0]),  # one node
    (Resources(1, 0.0, 0.5, True, 4), [1.0, 1.0]),  # one actor
])
def test_no_placement_group_where_placement_cannot_go_wrong(res: Resources, nodes: list[float]) -> None:
    """spread_actors makes a group only for several CPU actors on several nodes (no Ray needed
    here: it must not touch Ray in these cases; the two-node case runs in test_faults)."""
    with spread_actors(res, nodes, print) as placement:
        assert placement is None


@pytest.mark.parametrize("images, actors, want", [
    (40, 2, 32),  # a small job: blocks of 32 (two CPU actors, two blocks)
    (2000, 1, 128),  # one GPU actor: 16 read tasks, not 63
    (2000, 8, 63),  # eight actors: ~4 blocks each
    (10_000_000, 64, 5000),  # a bucket: at most MAX_INPUT_BLOCKS (2000) blocks
])
def test_read_tasks_are_large_but_feed_every_actor(images: int, actors: int, want: int) -> None:
    assert read_block_rows(images, actors) == want


def test_resources_that_cannot_run_are_refused_in_one_line(inputs: dict, tmp_path: Path) -> None:
    with pytest.raises(SegmentError, match=r"--actors 4 CPU actors with --postprocess tasks need 2.5 CPUs .* has 2"):
        resolve_resources(_config(inputs, tmp_path, actors=4, postprocess="tasks"), {"CPU": 2.0})


def test_one_images_row_per_input_with_errors(first_run: dict, inputs: dict) -> None:
    images = read_table(first_run["output"], "images")
    assert sorted(images.image_id) == sorted([*NAMES, CORRUPT])
    bad = images[images.image_id == CORRUPT].iloc[0]
    assert bad.status == "error" and CORRUPT in bad.error and bad.num_proposals == 0
    assert pd.isna(bad.width) and pd.isna(bad.height)
    ok = images[images.status == "ok"]
    assert ok.error.isna().all() and (ok.num_proposals > 0).all()
    assert all(uri.startswith("file://") and uri.endswith(i) for uri, i in zip(images.uri, images.image_id))
    for _, row in ok.iterrows():  # width/height are the decoded image's
        h, w = decode_image(read_bytes(row.uri, None), row.uri).shape[:2]
        assert (row.height, row.width) == (h, w)
    s = first_run["summary"]
    assert (s["images_ok"], s["images_error"], s["shards"]) == (len(NAMES), 1, 3)
    assert s["proposals"] == int(ok.num_proposals.sum()) == len(read_table(first_run["output"], "masks"))


def test_files_schema_layout_and_history(first_run: dict, inputs: dict) -> None:
    from deltalake import DeltaTable

    out = first_run["output"]
    run_id = first_run["summary"]["run_id"]
    dt = DeltaTable(str(out / "segments"))
    files = sorted(u.rsplit("/", 1)[-1] for u in dt.file_uris())
    # one data file per shard of the run, named part-<shard>-<run>-<uuid>.parquet
    assert [f.rsplit("-", 1)[0] for f in files] == [f"part-00000{i}-{run_id}" for i in range(3)]
    assert sorted(p.name for p in (out / "segments").glob("*.parquet")) == files  # nothing uncommitted
    stats = {a["path"]: a for a in pa.table(dt.get_add_actions(flatten=True)).to_pylist()}
    for f in files:
        meta = pq.ParquetFile(out / "segments" / f).metadata
        assert pq.read_schema(out / "segments" / f).remove_metadata() == SEGMENTS_SCHEMA
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert meta.row_group(0).column(0).statistics.has_min_max  # image_id stats: readers can prune
        table = pq.read_table(out / "segments" / f)
        # the add action's stats are the file's: one shard of one run, its row count, its ids
        assert stats[f]["num_records"] == table.num_rows
        assert stats[f]["min.shard_id"] == stats[f]["max.shard_id"] == f.split("-")[1]
        assert stats[f]["min.run_id"] == stats[f]["max.run_id"] == run_id
        assert stats[f]["min.image_id"] == min(table.column("image_id").to_pylist())
        ids = table.column("image_id").to_pylist()
        assert ids == sorted(ids)
        for row in table.to_pylist():  # proposals nested, best first
            assert [p["rank"] for p in row["proposals"]] == list(range(row["num_proposals"]))
    # the run's record is in every commit's metadata: fence, the groups, the end
    history = dt.history()
    assert {c.get("ifcn.run", {}).get("run_id") for c in history} == {run_id}
    assert history[-1]["operation"] == "CREATE TABLE" and dt.transaction_version("ifcn.lease") == 1
    record = history[0]["ifcn.run"]  # the newest commit: the run's end
    assert record["checkpoint_sha256"] == ifcn.checkpoint_digest(inputs["checkpoint"])
    assert set(record["versions"]) >= {"ifcn", "torch", "ray", "pyarrow", "deltalake"}
    assert record["totals"]["images"] == len(NAMES) + 1 and record["counts"]["num_images"] == len(NAMES) + 1
    assert record["config"]["inference"]["scales"] == list(INFERENCE["scales"])
    assert (record["complete"], record["exit"]) == (False, "16.7% error rows, over --max-error-rate 0.1")
    listing = pq.read_table(out / "_runs" / run_id / "listing" / "part-00000.parquet")  # a folder: one part
    assert sorted(listing.column("image_id").to_pylist()) == sorted([*NAMES, CORRUPT])
    assert set(listing.column_names) == {"image_id", "uri", "etag", "size"}
    assert not (out / "_tmp").exists()  # a finished run leaves no temp folder, not even an empty one
    for gone in ("_commits", "_SUCCESS", "_job.json", "_manifest.json", "masks", "images"):
        assert not (out / gone).exists()


def test_readers_duckdb_polars_ray_pycocotools(first_run: dict) -> None:
    """Every reader sees the one table; flat rows come from unnesting `proposals` (DuckDB's
    unnest, polars' explode) and equal deltalake's own rows."""
    import polars as pl
    import ray.data
    from deltalake import DeltaTable

    out = first_run["output"]
    masks = read_table(out, "masks")
    data = DeltaTable(str(out / "segments")).to_pyarrow_dataset()  # noqa: F841 (DuckDB finds it by name)
    flat = duckdb.sql("select image_id, status, unnest(proposals, recursive := true) from data")  # noqa: F841
    counts = duckdb.sql("select image_id, count(*) n, max(score) top from flat group by image_id "
                        "order by image_id").fetchall()
    expect = masks.groupby("image_id").agg(n=("rank", "size"), top=("score", "max")).sort_index()
    assert [(i, n) for i, n, _ in counts] == list(zip(expect.index, expect.n))
    np.testing.assert_array_equal([t for *_, t in counts], expect.top.to_numpy())
    best = duckdb.sql("select image_id, score from flat where rank = 0 order by image_id").fetchall()
    assert [s for _, s in best] == [t for *_, t in counts]  # rank 0 is the top score
    assert duckdb.sql("select count(*) from flat where status = 'ok'").fetchall() == [(len(masks),)]
    polars = (pl.read_delta(str(out / "segments")).explode("proposals").unnest("proposals")
              .drop_nulls("rank").to_pandas().sort_values(["image_id", "rank"]).reset_index(drop=True))
    pd.testing.assert_frame_equal(polars[masks.columns], masks, check_dtype=False)
    rds = ray.data.read_delta(str(out / "segments"))
    assert rds.count() == len(NAMES) + 1
    assert sum(len(r["proposals"]) for r in rds.iter_rows()) == len(masks)
    for row in masks.itertuples():
        rle = {"size": [int(row.height), int(row.width)], "counts": row.rle.encode()}
        decoded = mask_utils.decode(rle)  # (H, W) uint8
        assert decoded.shape == (row.height, row.width)
        assert int(decoded.sum()) == int(mask_utils.area(rle)) == row.area
        np.testing.assert_allclose(mask_utils.toBbox(rle), row.bbox, atol=1e-4)


def test_rerun_processes_nothing_and_rewrites_nothing(first_run: dict, inputs: dict) -> None:
    out = first_run["output"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")}
    masks_before, images_before = read_table(out, "masks"), read_table(out, "images")
    summary = run_segment(_config(inputs, out))
    assert (summary["done"], summary["shards"], summary["images_this_run"]) == (6, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")} == before
    pd.testing.assert_frame_equal(read_table(out, "masks"), masks_before)
    pd.testing.assert_frame_equal(read_table(out, "images"), images_before)


def test_grown_and_changed_bucket_processes_only_the_change(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    """A copy of the output over a bucket with one new key and one key overwritten by another
    image: only those two are processed; the changed key's rows are replaced, the rest stay."""
    out, bucket = tmp_path / "out", tmp_path / "bucket"
    shutil.copytree(first_run["output"], out)
    shutil.copytree(inputs["images"], bucket)
    write_images(bucket, ["zz_new.png"], seed=5)
    time.sleep(0.01)
    write_images(bucket, ["a.jpg"], seed=9)  # same key, another object (mtime and size change)
    (bucket / "nested" / "d.png").unlink()  # vanished: its rows stay
    with pytest.raises(SegmentError, match="nms_iou: 0.8 before, 0.5 now"):
        run_segment(_config(inputs, out, input=bucket, nms_iou=0.5))
    summary = run_segment(_config(inputs, out, input=bucket, shard_size=1))  # shard size is no setting
    assert {k: summary[k] for k in ("new", "changed", "to_retry", "vanished", "done", "images_this_run")} == \
        {"new": 1, "changed": 1, "to_retry": 0, "vanished": 1, "done": 4, "images_this_run": 2}
    images, masks = read_table(out, "images", bookkeeping=True), read_table(out, "masks", bookkeeping=True)
    assert sorted(images.image_id) == sorted([*NAMES, CORRUPT, "zz_new.png"])  # d.png kept, nothing twice
    old_images, old_masks = read_table(first_run["output"], "images"), read_table(first_run["output"], "masks")
    fresh = {"a.jpg", "zz_new.png"}
    for table, old, n in ((images, old_images, 12), (masks, old_masks, None)):
        runs = table.groupby("image_id").run_id.nunique()
        assert (runs == 1).all()  # no image has rows of two runs
        kept = table[~table.image_id.isin(fresh)].drop(columns=["shard_id", "run_id"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(kept, old[old.image_id != "a.jpg"].reset_index(drop=True))
        assert set(table[table.image_id.isin(fresh)].run_id) == {summary["run_id"]}
    for name in fresh:
        got = masks[masks.image_id == name]
        ref = _reference(inputs, (bucket / name).as_uri())
        assert got.rle.tolist() == [p["rle"]["counts"] for p in ref] and len(ref) > 0
    row = images[images.image_id == "a.jpg"].iloc[0]
    assert row["size"] == (bucket / "a.jpg").stat().st_size and row.etag.startswith("mtime:")
    # --prune deletes the vanished key's rows (and processes nothing)
    pruned = run_segment(_config(inputs, out, input=bucket, prune=True))
    assert (pruned["vanished"], pruned["images_this_run"]) == (1, 0)
    assert "nested/d.png" not in set(read_table(out, "images").image_id) | set(read_table(out, "masks").image_id)
    assert len(read_table(out, "images")) == len(images) - 1
    assert run_segment(_config(inputs, out, input=bucket))["vanished"] == 0


def test_a_retry_row_whose_key_vanished_does_not_fail_the_run(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    """The plan counts it as vanished, not to retry: the run ends 0, the row stays (until --prune)."""
    from pipeline.tables.delta import OutputTables
    from pipeline.tables.files import write_data_file
    from segment_helpers import nest

    out = tmp_path / "out"
    shutil.copytree(first_run["output"], out)
    tables = OutputTables(str(out))
    tables.fence({"run_id": "hand"}, {})
    row = {"image_id": "gone.jpg", "uri": "file:///gone.jpg", "status": "retry", "num_proposals": 0,
           "error": "image file:///gone.jpg: reading failed 5 times (Timeout)", "shard_id": "000099", "run_id": "hand"}
    import fsspec
    add = write_data_file(fsspec.filesystem("file"), str(out), nest([row], []), "000099", "hand")
    tables.commit_group("hand", 1, [add], [], {"run_id": "hand"})
    summary = run_segment(_config(inputs, out, max_error_rate=0.5))
    assert (summary["vanished"], summary["to_retry"], summary["images_retry"], summary["complete"]) == (1, 0, 0, True)
    assert "gone.jpg" in set(read_table(out, "images").image_id)
    pruned = run_segment(_config(inputs, out, max_error_rate=0.5, prune=True))
    assert pruned["vanished"] == 1 and "gone.jpg" not in set(read_table(out, "images").image_id)


def test_cli_names_a_damaged_data_file_and_the_repair_in_one_line(first_run: dict, inputs: dict,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "o"
    shutil.copytree(first_run["output"], out)
    victim = sorted((out / "segments").glob("part-*.parquet"))[1]
    data = bytearray(victim.read_bytes())
    data[8:24] = bytes(b ^ 0xFF for b in data[8:24])  # damaged in place: same size
    victim.write_bytes(bytes(data))
    r = cli("--input", str(inputs["images"]), "--output", str(out), "--checkpoint", inputs["checkpoint"],
            "--shard-size", "2", *inference_flags())
    # the planner reads the table by key range as parts come, so the run's first log line may precede
    _assert_one_line_error(r, victim.name, "jobs.check", "--repair", after=("run ",))


def test_read_output_and_delta_readers_see_committed_files_only(first_run: dict, tmp_path: Path) -> None:
    """A data file in the table folder that no commit added (a publish killed before the commit):
    a plain Parquet glob sees it; read_output, deltalake, polars, Ray and DuckDB over deltalake do not."""
    import polars as pl
    import pyarrow.dataset as pads
    import ray.data
    from deltalake import DeltaTable

    from pipeline import read_output

    full = read_output(str(first_run["output"]))
    assert full.num_rows == len(read_table(first_run["output"], "masks")) > 0
    assert read_output(str(first_run["output"]), "images").num_rows == len(NAMES) + 1
    out = tmp_path / "out"
    shutil.copytree(first_run["output"], out)
    committed = sorted((out / "segments").glob("part-*.parquet"))[0]
    shutil.copy(committed, out / "segments" / "part-000009-stray-0.parquet")
    glob = duckdb.sql(f"select count(*) from read_parquet('{out}/segments/*.parquet')").fetchall()[0][0]
    assert glob > len(NAMES) + 1  # what a plain glob sees: the uncommitted file too
    masks = read_output(f"file://{out}", "masks", ["image_id", "rank"])
    assert masks.num_rows == full.num_rows
    assert DeltaTable(str(out / "segments")).to_pyarrow_dataset().count_rows() == len(NAMES) + 1
    assert pl.read_delta(str(out / "segments")).height == len(NAMES) + 1
    assert ray.data.read_delta(str(out / "segments")).count() == len(NAMES) + 1
    data = DeltaTable(str(out / "segments")).to_pyarrow_dataset()
    assert duckdb.from_arrow(data).count("*").fetchall() == [(len(NAMES) + 1,)]
    images = read_output(str(out), "images")
    assert images.schema == IMAGES_SCHEMA and images.num_rows == len(NAMES) + 1
    one = sorted(set(masks.column("image_id").to_pylist()))[0]
    rds = read_output(str(out), "masks", ["image_id", "score"], pads.field("image_id") == one, ray=True)
    assert sorted(rds.to_pandas().score) == sorted(full.filter(pads.field("image_id") == one)["score"].to_pylist())
    # time travel: the table's first commit (the run's fence) held no row, the second one group
    assert read_output(str(out), "images", version=0).num_rows == 0
    assert 0 < read_output(str(out), "images", version=1).num_rows <= len(NAMES) + 1
    with pytest.raises(FileNotFoundError, match="not a jobs.segment output"):
        read_output(str(tmp_path / "nothing"))


def test_history_lists_runs_one_line_each(first_run: dict, inputs: dict, tmp_path: Path, capsys) -> None:
    from jobs.show import main as show_main

    out = tmp_path / "out"
    shutil.copytree(first_run["output"], out)
    mine = run_segment(_config(inputs, out, max_error_rate=0.5))["run_id"]
    assert show_main([str(out), "--history"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()  # (other tests may have re-run the first output)
    assert lines[0].startswith(first_run["summary"]["run_id"]) and lines[-1].startswith(mine)
    assert "incomplete: 16.7% error rows, over --max-error-rate 0.1; 6 images (5 ok, 1 error, 0 retry)" in lines[0]
    assert "complete: done; 0 images" in lines[-1] and "checkpoint " + ifcn.checkpoint_digest(inputs["checkpoint"])[:12] \
        in lines[-1]


def test_overwrite_replaces_rows_of_other_settings_in_a_new_version(first_run: dict, inputs: dict,
                                                                    tmp_path: Path) -> None:
    from pipeline import read_output

    out = tmp_path / "out"
    shutil.copytree(first_run["output"], out)
    before = read_table(out, "masks")
    version = DeltaTable(str(out / "segments")).version()
    with pytest.raises(SegmentError, match=r"max_proposals: 20 before, 3 now\); use a new --output, or --overwrite"):
        run_segment(_config(inputs, out, max_proposals=3))
    summary = run_segment(_config(inputs, out, max_proposals=3, overwrite=True))
    assert (summary["new"], summary["done"], summary["images_this_run"]) == (6, 0, 6)
    masks = read_table(out, "masks", bookkeeping=True)
    assert set(masks.run_id) == {summary["run_id"]} and masks.groupby("image_id").size().max() == 3
    # the top 3 of each image are the first run's ranks 0..2 (same model, same NMS)
    pd.testing.assert_frame_equal(masks.drop(columns=["shard_id", "run_id"]),
                                  before[before["rank"] < 3].reset_index(drop=True))
    old = read_output(str(out), "images", version=version).to_pandas()  # the old rows, by version
    assert len(old) == 6 and set(old.run_id) == {first_run["summary"]["run_id"]}
    assert run_segment(_config(inputs, out, max_proposals=3))["images_this_run"] == 0  # the new settings hold


def test_an_output_of_the_previous_layout_is_refused_in_one_line(inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_commits").mkdir(parents=True)
    (out / "_job.json").write_text("{}")
    with pytest.raises(SegmentError, match=r"older layout \(_job.json, _commits\); use a new --output"):
        prepare(_config(inputs, out))
    for marker in ("masks/_delta_log", "images/_delta_log", "_SUCCESS", "_manifest.json"):  # any one of them
        other = tmp_path / marker.replace("/", "_")
        (other / marker).parent.mkdir(parents=True, exist_ok=True)
        (other / marker).mkdir() if marker.endswith("_log") else (other / marker).write_text("{}")
        with pytest.raises(SegmentError, match=f"older layout \\({marker}\\)"):
            prepare(_config(inputs, other))


def test_actors_refuse_a_checkpoint_that_changed_after_planning(inputs: dict) -> None:
    sha = ifcn.checkpoint_digest(inputs["checkpoint"])
    InferenceActor(inputs["checkpoint"], ifcn.InferenceConfig(**INFERENCE).to_dict(), checkpoint_sha256=sha)
    with pytest.raises(ValueError, match=r"sha256 is .* but the job planned 000000000000"):
        InferenceActor(inputs["checkpoint"], ifcn.InferenceConfig(**INFERENCE).to_dict(), checkpoint_sha256="0" * 64)


def test_changed_settings_are_fine_before_any_commit(inputs: dict, tmp_path: Path) -> None:
    """A job killed before its first commit may be re-run with other settings (no Ray needed)."""
    out = tmp_path / "out"
    prepare(_config(inputs, out, nms_iou=0.5))
    plan = prepare(_config(inputs, out))
    assert plan.settings["settings"]["inference"]["nms_iou"] == 0.8
    assert [s.shard_id for s in plan.shards] == ["000000", "000001", "000002"]


@pytest.mark.parametrize("kind", ["txt", "parquet"])
def test_manifest_inputs(first_run: dict, inputs: dict, kind: str, tmp_path: Path) -> None:
    """Manifest URIs (local path, file:// URL, a missing file) -> image_id = full URI; proposals as before."""
    folder = inputs["images"]
    uris = [str(folder / "a.jpg"), (folder / "nested" / "d.png").as_uri(), str(folder / "missing.jpg")]
    manifest = tmp_path / f"list.{kind}"
    if kind == "txt":
        manifest.write_text("# images to segment\n" + "\n".join(uris) + "\n\n")
    else:
        pq.write_table(pa.table({"uri": uris, "extra": [1, 2, 3]}), manifest)
    out = tmp_path / "out"
    summary = run_segment(_config(inputs, out, input=manifest))
    assert (summary["images_ok"], summary["images_error"]) == (2, 1)
    images = read_table(out, "images").set_index("image_id")
    full = {u: (u if "://" in u else Path(u).as_uri()) for u in uris}
    assert sorted(images.index) == sorted(full.values())
    assert "no such file" in images.loc[full[uris[2]], "error"]
    masks = read_table(out, "masks")
    first = read_table(first_run["output"], "masks")
    for uri, name in ((uris[0], "a.jpg"), (uris[1], "nested/d.png")):
        assert masks[masks.image_id == full[uri]].rle.tolist() == first[first.image_id == name].rle.tolist()
        assert (masks[masks.image_id == full[uri]].uri == full[uri]).all()


def test_inference_and_postprocess_failures_become_error_rows(inputs: dict) -> None:
    """The stages called directly (no Ray): a bad row becomes an error row, its batch-mates go on."""
    uri = (inputs["images"] / "a.jpg").as_uri()
    read = read_images(pa.table({"image_id": ["a", "b"], "uri": [uri, uri], "shard_id": ["0", "0"]}),
                       None, 50_000_000, 16)
    pixels = read.column("pixels").to_pylist()
    read = read.set_column(read.schema.get_field_index("pixels"), "pixels",
                           pa.array([pixels[0], pixels[1][:-5]], pa.large_binary()))  # b: truncated pixels
    inferred = InferenceActor(inputs["checkpoint"], ifcn.InferenceConfig(**INFERENCE).to_dict())(read)
    assert inferred.column("status").to_pylist() == ["ok", "error"]
    assert "inference failed" in inferred.column("error")[1].as_py()
    doubled = pa.concat_tables([inferred.slice(0, 1), inferred.slice(0, 1)])
    # b's one mask: runs that do not cover its image (a corrupt hand-off)
    bad = SimpleNamespace(scores=[0.5], boxes=[[0, 0, 1, 1]], areas=[1], scales=[64], counts=[1, 2, 3], lengths=[3])
    proposals = pa.concat_arrays([inferred.column("proposals").combine_chunks().slice(0, 1), proposals_column([bad])])
    doubled = doubled.set_column(doubled.schema.get_field_index("proposals"), "proposals", proposals)
    reduced = encode_batch(doubled).to_pylist()
    assert [r["status"] for r in reduced] == ["ok", "error"]
    assert "encoding its masks failed" in reduced[1]["error"] and reduced[1]["proposals"] == []
    assert [p["rle"] for p in reduced[0]["proposals"]] == [p["rle"]["counts"] for p in _reference(inputs, uri)]


# --- CLI: one-line errors before any work starts (no Ray is started) ----------------------------

def _assert_one_line_error(result, *needles: str, after: tuple[str, ...] = ()) -> None:
    """One line of error and no traceback (after log lines starting with `after`, if any)."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and all(line.startswith(after) for line in lines[:-1]) \
        and (after or len(lines) == 1), result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_cli_wrong_flag(inputs: dict, tmp_path: Path) -> None:
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"],
            "--nms-iuo", "0.5")
    _assert_one_line_error(r, "--nms-iuo")
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"],
            "--scales", "64,big")
    _assert_one_line_error(r, "--scales", "64,big")
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"],
            "--nms-iou", "1.5")
    _assert_one_line_error(r, "--nms-iou 1.5")  # the flag, not the library field (InferenceConfig.nms_iou)
    assert not (tmp_path / "o").exists()


def test_cli_missing_checkpoint(inputs: dict, tmp_path: Path) -> None:
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"),
            "--checkpoint", str(tmp_path / "nope.pt"))
    _assert_one_line_error(r, "--checkpoint", "nope.pt")
    _assert_nothing_written(tmp_path / "o")


def _assert_nothing_written(out: Path) -> None:
    """The lease comes first (a second run is refused before anything is read) and is given back:
    no table, no lease left; only a local output's lock file, which is never deleted (pipeline/tables/lease.py)."""
    assert sorted(p.name for p in out.iterdir()) == [".lease.lock"]


def test_cli_missing_and_empty_input(inputs: dict, tmp_path: Path) -> None:
    r = cli("--input", str(tmp_path / "no_such_dir"), "--output", str(tmp_path / "o"),
            "--checkpoint", inputs["checkpoint"])
    _assert_one_line_error(r, "--input", "no_such_dir", "no such file or prefix")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    r = cli("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"])
    _assert_one_line_error(r, "--input", "no images found")
    _assert_nothing_written(tmp_path / "o")


def test_cli_rerun_prints_summary(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    """The CLI on a copy of the module's output re-runs nothing and prints the final summary."""
    out = tmp_path / "o"
    shutil.copytree(first_run["output"], out)
    args = ["--input", str(inputs["images"]), "--output", str(out), "--checkpoint", inputs["checkpoint"],
            "--shard-size", "2", *inference_flags()]
    r = cli(*args, "--max-error-rate", "0.2")
    assert r.returncode == 0, r.stderr
    assert "5 images ok, 1 errors" in r.stdout and str(out) in r.stdout and "images/s" in r.stdout
    # 1 of 6 images is an error row: over the default --max-error-rate 0.1 the job exits non-zero, in one line
    r = cli(*args)
    assert r.returncode == 3 and "5 images ok, 1 errors" in r.stdout and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # after the job's own progress lines
    for needle in ("error: 1 of 6 images (16.7%) are error rows", "--max-error-rate 0.1", "field('status') == 'error'"):
        assert needle in last, last
    assert read_table(out, "images").shape[0] == 6  # the tables are complete; the rate is the caller's to judge


def test_cli_dry_run_prints_the_plan_and_writes_nothing(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    out, bucket = tmp_path / "o", tmp_path / "bucket"
    shutil.copytree(first_run["output"], out)
    shutil.copytree(inputs["images"], bucket)
    write_images(bucket, ["zz_new.png", "zz_new2.png"], seed=5)
    (bucket / "a.jpg").unlink()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    r = cli("--input", str(bucket), "--output", str(out), "--checkpoint", inputs["checkpoint"],
            "--shard-size", "2", *inference_flags(), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "7 images; skipped keys that are not images: 1 .txt" in r.stdout
    assert "5 done, 2 new, 0 changed, 1 vanished, 0 to retry; 1 shards of 2 to run (2 images)" in r.stdout
    assert "nothing written" in r.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "new"), "--checkpoint",
            inputs["checkpoint"], "--dry-run")
    assert r.returncode == 0 and "0 done, 6 new" in r.stdout and not (tmp_path / "new").exists()
