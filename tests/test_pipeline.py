"""End-to-end runs of the batch job on a real local Ray: results equal the in-process Predictor,
one images row per input, re-runs skip committed shards, readers (DuckDB, pyarrow, pandas,
pycocotools) agree with the tables, manifest inputs, and the CLI's one-line errors."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

import ifcn
from pipeline.config import SegmentConfig, SegmentError
from ifcn.image import decode_image, read_bytes
from pipeline.infer import InferenceActor
from pipeline.reduce import encode_batch
from pipeline.run import Resources, prepare, resolve_resources, run_segment
from pipeline.schema import IMAGES_RESULT_COLUMNS, IMAGES_SCHEMA, MASKS_SCHEMA
from pipeline.sources import read_images
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
    # two 1-CPU nodes: 0.5 per actor, so a read task (0.5) fits beside an actor on either node
    ({"CPU": 2.0, "nodes": [1.0, 1.0]}, {"actors": 2}, Resources(2, 0.0, 0.5, True, 4)),
])
def test_resolve_resources(cluster: dict, kw: dict, want: Resources, inputs: dict, tmp_path: Path) -> None:
    cluster = dict(cluster)
    nodes = cluster.pop("nodes", None)
    assert resolve_resources(_config(inputs, tmp_path, **kw), cluster, nodes) == want


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


def test_files_schema_layout_and_manifest(first_run: dict, inputs: dict) -> None:
    out = first_run["output"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"part-00000{i}.parquet" for i in range(3)]
    for name, schema in (("masks", MASKS_SCHEMA), ("images", IMAGES_SCHEMA)):
        for f in (out / name).iterdir():
            meta = pq.ParquetFile(f).metadata
            assert pq.read_schema(f).remove_metadata() == schema
            assert meta.row_group(0).column(0).compression == "ZSTD"
            assert meta.row_group(0).column(0).statistics.has_min_max  # image_id stats: readers can prune
        table = pq.read_table(out / name / "part-000001.parquet")
        keys = list(zip(*(table.column(k).to_pylist() for k in (["image_id", "rank"] if name == "masks"
                                                                else ["image_id"]))))
        assert keys == sorted(keys)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == ifcn.checkpoint_digest(inputs["checkpoint"])
    assert set(manifest["versions"]) >= {"ifcn", "torch", "ray", "pyarrow"}
    assert manifest["counts"]["images"] == len(NAMES) + 1
    assert manifest["config"]["inference"]["scales"] == list(INFERENCE["scales"])
    assert len(list((out / "_commits").iterdir())) == 3
    assert (out / "_SUCCESS").read_bytes() == b""  # complete: Spark/Hadoop readers' convention
    assert not (out / "_tmp").exists()  # a finished run leaves no temp folder, not even an empty one


def test_readers_duckdb_pandas_pycocotools(first_run: dict) -> None:
    out = first_run["output"]
    masks = read_table(out, "masks")
    counts = duckdb.sql(f"select image_id, count(*) n, max(score) top from read_parquet('{out}/masks/**/*.parquet') "
                        f"group by image_id order by image_id").fetchall()
    expect = masks.groupby("image_id").agg(n=("rank", "size"), top=("score", "max")).sort_index()
    assert [(i, n) for i, n, _ in counts] == list(zip(expect.index, expect.n))
    np.testing.assert_array_equal([t for *_, t in counts], expect.top.to_numpy())
    best = duckdb.sql(f"select image_id, score from read_parquet('{out}/masks/**/*.parquet') where rank = 0 "
                      f"order by image_id").fetchall()
    assert [s for _, s in best] == [t for *_, t in counts]  # rank 0 is the top score
    joined = duckdb.sql(f"select count(*) from read_parquet('{out}/masks/**/*.parquet') m join "
                        f"read_parquet('{out}/images/**/*.parquet') i using (image_id) "
                        f"where i.status = 'ok'").fetchall()
    assert joined == [(len(masks),)]
    assert len(pd.read_parquet(out / "masks")) == len(masks)  # pandas reads the folder too
    for row in masks.itertuples():
        rle = {"size": [int(row.height), int(row.width)], "counts": row.rle.encode()}
        decoded = mask_utils.decode(rle)  # (H, W) uint8
        assert decoded.shape == (row.height, row.width)
        assert int(decoded.sum()) == int(mask_utils.area(rle)) == row.area
        np.testing.assert_allclose(mask_utils.toBbox(rle), row.bbox, atol=1e-4)


def test_rerun_skips_committed_shards(first_run: dict, inputs: dict) -> None:
    out = first_run["output"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")}
    masks_before, images_before = read_table(out, "masks"), read_table(out, "images")
    summary = run_segment(_config(inputs, out))
    assert (summary["shards_skipped"], summary["shards_run"], summary["images_this_run"]) == (3, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")} == before
    pd.testing.assert_frame_equal(read_table(out, "masks"), masks_before)
    pd.testing.assert_frame_equal(read_table(out, "images"), images_before)


def test_rerun_finishes_partial_output_without_duplicates(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    """A copy of the output with one shard's marker gone and a stray temp file: the shard is redone."""
    out = tmp_path / "out"
    shutil.copytree(first_run["output"], out)
    (out / "_commits" / "000001.json").unlink()
    (out / "_tmp" / "junk").mkdir(parents=True, exist_ok=True)
    (out / "_tmp" / "junk" / "part-000001.parquet").write_bytes(b"half a file")
    summary = run_segment(_config(inputs, out))
    assert (summary["shards_skipped"], summary["shards_run"], summary["images_this_run"]) == (2, 1, 2)
    cols = list(IMAGES_RESULT_COLUMNS)
    pd.testing.assert_frame_equal(read_table(out, "images")[cols], read_table(first_run["output"], "images")[cols])
    pd.testing.assert_frame_equal(read_table(out, "masks"), read_table(first_run["output"], "masks"))


def test_read_output_sees_committed_shards_only(first_run: dict, tmp_path: Path) -> None:
    """After a crash between a shard's files and its marker, a plain glob sees the shard and
    pipeline.read_output does not; on a complete output both agree (pyarrow and Ray Dataset)."""
    import pyarrow.dataset as pads

    from pipeline import read_output

    full = read_output(str(first_run["output"]))
    assert full.num_rows == len(read_table(first_run["output"], "masks")) > 0
    assert read_output(str(first_run["output"]), "images").num_rows == len(NAMES) + 1
    out = tmp_path / "out"
    shutil.copytree(first_run["output"], out)
    (out / "_commits" / "000001.json").unlink()
    lost = set(pq.read_table(out / "images" / "part-000001.parquet").column("image_id").to_pylist())
    glob = duckdb.sql(f"select count(*) from read_parquet('{out}/masks/*.parquet')").fetchall()[0][0]
    assert glob == full.num_rows  # what a plain glob sees: the uncommitted shard too
    masks = read_output(f"file://{out}", "masks", ["image_id", "rank"])
    assert set(masks.column("image_id").to_pylist()) == set(full.column("image_id").to_pylist()) - lost
    assert masks.num_rows == sum(i not in lost for i in full.column("image_id").to_pylist())
    images = read_output(str(out), "images")
    assert images.schema == IMAGES_SCHEMA and lost.isdisjoint(images.column("image_id").to_pylist())
    one = sorted(set(masks.column("image_id").to_pylist()))[0]
    rds = read_output(str(out), "masks", ["image_id", "score"], pads.field("image_id") == one, ray=True)
    assert sorted(rds.to_pandas().score) == sorted(full.filter(pads.field("image_id") == one)["score"].to_pylist())
    with pytest.raises(FileNotFoundError, match="not a jobs.segment output"):
        read_output(str(tmp_path / "nothing"))


def test_mismatched_rerun_is_refused(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    out = first_run["output"]
    with pytest.raises(SegmentError, match="nms_iou: 0.8 before, 0.5 now"):
        run_segment(_config(inputs, out, nms_iou=0.5))
    with pytest.raises(SegmentError, match="shard_size: 2 before, 3 now"):
        run_segment(_config(inputs, out, shard_size=3))
    other = tmp_path / "images"
    shutil.copytree(inputs["images"], other)
    write_images(other, ["zz_new.png"], seed=5)
    with pytest.raises(SegmentError, match=r"input listing differs \(6 images before, 7 now\)"):
        run_segment(_config(inputs, out, input=other))


def test_resumed_run_removes_success_until_it_completes(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(first_run["output"], out)
    (out / "_commits" / "000002.json").unlink()
    prepare(_config(inputs, out))  # what a re-run does first
    assert not (out / "_SUCCESS").exists()
    run_segment(_config(inputs, out))
    assert (out / "_SUCCESS").exists() and not (out / "_tmp").exists()


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
    assert json.loads((out / "_job.json").read_text())["settings"]["inference"]["nms_iou"] == 0.8
    assert [s.shard_id for s in plan.pending] == ["000000", "000001", "000002"]


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
    blobs = inferred.column("proposals").to_pylist()
    doubled = pa.concat_tables([inferred.slice(0, 1), inferred.slice(0, 1)])
    doubled = doubled.set_column(doubled.schema.get_field_index("proposals"), "proposals",
                                 pa.array([blobs[0], b"not npz"], pa.large_binary()))
    reduced = encode_batch(doubled).to_pylist()
    assert [r["status"] for r in reduced] == ["ok", "error"]
    assert "encoding its masks failed" in reduced[1]["error"] and reduced[1]["proposals"] == []
    assert [p["rle"] for p in reduced[0]["proposals"]] == [p["rle"]["counts"] for p in _reference(inputs, uri)]


# --- CLI: one-line errors before any work starts (no Ray is started) ----------------------------

def _assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_wrong_flag(inputs: dict, tmp_path: Path) -> None:
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"],
            "--nms-iuo", "0.5")
    _assert_one_line_error(r, "--nms-iuo")
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"],
            "--scales", "64,big")
    _assert_one_line_error(r, "--scales", "64,big")
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"],
            "--nms-iou", "1.5")
    _assert_one_line_error(r, "nms_iou")
    assert not (tmp_path / "o").exists()


def test_cli_missing_checkpoint(inputs: dict, tmp_path: Path) -> None:
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "o"),
            "--checkpoint", str(tmp_path / "nope.pt"))
    _assert_one_line_error(r, "--checkpoint", "nope.pt")
    assert not (tmp_path / "o").exists()


def test_cli_missing_and_empty_input(inputs: dict, tmp_path: Path) -> None:
    r = cli("--input", str(tmp_path / "no_such_dir"), "--output", str(tmp_path / "o"),
            "--checkpoint", inputs["checkpoint"])
    _assert_one_line_error(r, "--input", "no_such_dir", "no such file or prefix")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    r = cli("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--checkpoint", inputs["checkpoint"])
    _assert_one_line_error(r, "--input", "no images found")
    assert not (tmp_path / "o").exists()


def test_cli_rerun_prints_summary(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    """The CLI on a copy of the module's output re-runs nothing and prints the final summary."""
    out = tmp_path / "o"
    shutil.copytree(first_run["output"], out)
    args = ["--input", str(inputs["images"]), "--output", str(out), "--checkpoint", inputs["checkpoint"],
            "--shard-size", "2", *inference_flags()]
    r = cli(*args, "--max-error-rate", "0.2")
    assert r.returncode == 0, r.stderr
    assert "5 images ok, 1 errors" in r.stdout and str(out) in r.stdout and "images/s" in r.stdout
    assert os.path.exists(out / "_manifest.json")
    # 1 of 6 images is an error row: over the default --max-error-rate 0.1 the job exits non-zero, in one line
    r = cli(*args)
    assert r.returncode == 3 and "5 images ok, 1 errors" in r.stdout and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # after the job's own progress lines
    for needle in ("error: 1 of 6 images (16.7%) are error rows", "--max-error-rate 0.1", "status = 'error'"):
        assert needle in last, last
    assert (out / "_SUCCESS").exists()  # the tables are complete; the rate is the caller's to judge


def test_cli_dry_run_prints_the_plan_and_writes_nothing(first_run: dict, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "o"
    shutil.copytree(first_run["output"], out)
    (out / "_commits" / "000001.json").unlink()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    r = cli("--input", str(inputs["images"]), "--output", str(out), "--checkpoint", inputs["checkpoint"],
            "--shard-size", "2", *inference_flags(), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "6 images; skipped keys that are not images: 1 .txt" in r.stdout
    assert "3 shards of 2, 2 committed, 1 to run (2 images)" in r.stdout and "nothing written" in r.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # _SUCCESS, stray parts: all kept
    r = cli("--input", str(inputs["images"]), "--output", str(tmp_path / "new"), "--checkpoint",
            inputs["checkpoint"], "--dry-run")
    assert r.returncode == 0 and "0 committed" in r.stdout and not (tmp_path / "new").exists()
