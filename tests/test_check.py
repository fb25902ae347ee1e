"""jobs.check / pipeline.check: damaged files of the output's Delta tables are named, and --repair
removes exactly their shards' rows in one commit per table.

Tables are built here as the pipeline lays them out (DELTA_LAYOUT): one Parquet file per shard per
table, named part-<shard>-<run>-<uuid>.parquet, committed as add actions with stats. Expected rows
and reasons come from what the test wrote and from the store's own file sizes, never from the tool.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction, create_table_with_add_actions

from pipeline.check import Damage, check_output, file_shards, repair_output

REPO = Path(__file__).resolve().parents[1]
RUN = "r20261129"
SHARDS = [f"{i:05d}" for i in range(6)]
IMAGES_PER_SHARD = 4


def _rows(shard: str) -> tuple[pa.Table, pa.Table]:
    """(images, masks) rows of one shard: 4 images, 1-3 proposals each (counts vary by shard)."""
    s = int(shard)
    ids = [f"a/{s:03d}{i:02d}.jpg" for i in range(IMAGES_PER_SHARD)]
    n = [1 + (s + i) % 3 for i in range(IMAGES_PER_SHARD)]
    images = pa.table({"image_id": ids, "uri": [f"s3://in/{x}" for x in ids],
                       "status": ["ok"] * len(ids), "num_proposals": pa.array(n, pa.int32()),
                       "shard_id": [shard] * len(ids), "run_id": [RUN] * len(ids)})
    m_ids = [x for x, k in zip(ids, n) for _ in range(k)]
    masks = pa.table({"image_id": m_ids, "uri": [f"s3://in/{x}" for x in m_ids],
                      "rank": pa.array([r for k in n for r in range(k)], pa.int32()),
                      "score": pa.array([0.9 - 0.1 * r for k in n for r in range(k)], pa.float32()),
                      "shard_id": [shard] * len(m_ids), "run_id": [RUN] * len(m_ids)})
    return images, masks


def _stats(t: pa.Table) -> str:
    cols = ("image_id", "shard_id", "run_id")
    return json.dumps({"numRecords": t.num_rows,
                       "minValues": {c: min(t.column(c).to_pylist()) for c in cols},
                       "maxValues": {c: max(t.column(c).to_pylist()) for c in cols},
                       "nullCount": {c: 0 for c in cols}})


def _fs_and_root(uri: str, s3: bool):
    import fsspec

    fs = fsspec.filesystem("s3" if s3 else "file", skip_instance_cache=True)
    return fs, uri.removeprefix("s3://") if s3 else uri


def _build(out: str, opts: dict | None, s3: bool) -> dict[str, dict[str, str]]:
    """Writes both tables (one file per shard, two commits per table); returns table -> shard -> path."""
    paths: dict[str, dict[str, str]] = {"images": {}, "masks": {}}
    for table in ("masks", "images"):
        fs, root = _fs_and_root(f"{out}/{table}", s3)
        fs.makedirs(root, exist_ok=True)
        adds, schema = [], None
        for shard in SHARDS:
            t = _rows(shard)[0 if table == "images" else 1]
            schema = t.schema
            name = f"part-{shard}-{RUN}-{uuid.uuid4()}.parquet"
            with fs.open(f"{root}/{name}", "wb") as f:
                pq.write_table(t, f, compression="zstd")
            adds.append(AddAction(name, fs.size(f"{root}/{name}"), {}, 1_700_000_000_000, True, _stats(t)))
            paths[table][shard] = name
        from deltalake import Schema

        create_table_with_add_actions(f"{out}/{table}", Schema.from_arrow(schema), adds[:3], storage_options=opts)
        dt = DeltaTable(f"{out}/{table}", storage_options=opts)
        dt.create_write_transaction(adds[3:], mode="append", schema=dt.schema(),
                                    commit_properties=CommitProperties(custom_metadata={"run_id": RUN}))
    return paths


def _expected(table: str, drop: set[str]) -> list[dict]:
    rows = [r for s in SHARDS if s not in drop for r in _rows(s)[0 if table == "images" else 1].to_pylist()]
    return sorted(rows, key=lambda r: (r["image_id"], r.get("rank", 0)))


def _read(out: str, table: str, opts: dict | None, version: int | None = None, shard: str | None = None) -> list[dict]:
    filters = [("shard_id", "=", shard)] if shard else None  # file stats prune the other shards' files
    t = DeltaTable(f"{out}/{table}", version=version, storage_options=opts).to_pyarrow_table(filters=filters)
    return sorted(t.to_pylist(), key=lambda r: (r["image_id"], r.get("rank", 0)))


def _same_size_parquet(t: pa.Table, size: int) -> bytes:
    """A valid Parquet file of `t` padded (footer key-value metadata) to exactly `size` bytes."""
    for pad in range(size):
        sink = pa.BufferOutputStream()
        with pq.ParquetWriter(sink, t.schema, compression="zstd", store_schema=False) as w:
            w.write_table(t)
            w.add_key_value_metadata({"pad": "x" * pad})
        got = sink.getvalue().size
        if got == size:
            return sink.getvalue().to_pybytes()
        if got > size:
            break
    raise AssertionError(f"could not pad to {size} bytes")


def _damage(kind: str, out: str, paths: dict, s3: bool) -> tuple[str, str, str]:
    """Damages one file; returns (table, path, expected reason)."""
    fs, _ = _fs_and_root(out, s3)
    root = out.removeprefix("s3://") if s3 else out
    at = lambda table, shard: f"{root}/{table}/{paths[table][shard]}"  # noqa: E731
    target = at("masks", "00001")
    size = fs.size(target)
    if kind == "truncate":
        data = fs.cat_file(target)
        fs.pipe_file(target, data[: size // 2])
        return "masks", paths["masks"]["00001"], f"size {size // 2} != {size} (log)"
    if kind == "delete":
        fs.rm_file(target)
        return "masks", paths["masks"]["00001"], "missing"
    if kind == "copy":  # another shard's file over this one, as a careless `cp` would
        other = fs.cat_file(at("masks", "00002"))
        fs.pipe_file(target, other)
        if len(other) != size:
            return "masks", paths["masks"]["00001"], f"size {len(other)} != {size} (log)"
        pytest.fail("test data: shard files happened to have equal size; the 'copy' case needs them different")
    if kind == "rows":  # same size, another row count: only the footer tells
        t = _rows("00001")[1]
        fs.pipe_file(target, _same_size_parquet(t.slice(0, 2), size))
        return "masks", paths["masks"]["00001"], f"rows 2 != {t.num_rows} (log)"
    if kind == "shard":  # same size and rows, another shard's rows (a copy the size cannot catch)
        images = _rows("00004")[0]  # 4 rows, as in every images file
        target = at("images", "00001")
        fs.pipe_file(target, _same_size_parquet(images, fs.size(target)))
        return "images", paths["images"]["00001"], "shard_id 00004..00004 != 00001..00001 (log)"
    if kind == "garbage":
        fs.pipe_file(target, b"\0" * size)
        return "masks", paths["masks"]["00001"], "unreadable footer"
    raise ValueError(kind)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.check", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


@pytest.fixture
def local_out(tmp_path: Path) -> tuple[str, dict]:
    out = str(tmp_path / "out")
    return out, _build(out, None, s3=False)


def test_clean_output_passes(local_out):
    out, _ = local_out
    checks = check_output(out)
    assert [(c.table, c.files, c.damaged) for c in checks] == [("images", 6, ()), ("masks", 6, ())]
    r = _cli(out)
    assert r.returncode == 0, r.stderr
    assert "images: 6 files at version 1, masks: 6 files at version 1; all match the log" in r.stdout


@pytest.mark.parametrize("kind", ["truncate", "delete", "copy", "rows", "shard", "garbage"])
def test_each_damage_is_named_with_its_reason(local_out, kind):
    out, paths = local_out
    table, path, reason = _damage(kind, out, paths, s3=False)
    damaged = [d for c in check_output(out) for d in c.damaged]
    assert len(damaged) == 1, damaged
    d = damaged[0]
    assert (d.table, d.path, d.shard_id) == (table, path, "00001")
    assert d.reason.startswith(reason) if kind == "garbage" else d.reason == reason
    r = _cli(out)
    assert r.returncode == 1
    assert f"{table} {path}: {d.reason} (shard 00001)" in r.stdout
    assert "1 damaged, in shards 00001" in r.stdout


def _assert_repaired(out: str, opts: dict | None, before: dict[str, int], drop: set[str]) -> None:
    for table in ("images", "masks"):
        assert _read(out, table, opts) == _expected(table, drop)  # reads every file: none is damaged
    images, masks = (DeltaTable(f"{out}/{t}", storage_options=opts) for t in ("images", "masks"))
    assert (images.version(), masks.version()) == (before["images"] + 1, before["masks"] + 1)
    record = masks.history(1)[0]["ifcn.repair"]
    assert record["shards"] == sorted(drop)
    # images were repaired first: its commit is older than the masks one
    assert images.history(1)[0]["timestamp"] <= masks.history(1)[0]["timestamp"]
    # time travel: the version before the repair still lists every shard; undamaged removed rows read
    old = DeltaTable(f"{out}/images", version=before["images"], storage_options=opts)
    assert sorted(file_shards(pa.table(old.get_add_actions(flatten=True)))) == SHARDS


def test_repair_removes_exactly_the_damaged_shards(local_out):
    out, paths = local_out
    _damage("truncate", out, paths, s3=False)  # masks of shard 00001
    os.remove(f"{out}/images/{paths['images']['00003']}")  # images of shard 00003
    before = {t: DeltaTable(f"{out}/{t}").version() for t in ("images", "masks")}
    r = _cli(out, "--repair")
    assert r.returncode == 0, r.stderr
    assert "removed 2 files from images" in r.stdout and "removed 2 files from masks" in r.stdout
    _assert_repaired(out, None, before, {"00001", "00003"})
    # the undamaged masks file of shard 00003 still reads at the old version, by time travel
    old = _read(out, "masks", None, before["masks"], shard="00003")
    assert old == [r for r in _expected("masks", set()) if r["shard_id"] == "00003"]
    assert _cli(out).returncode == 0  # clean now


def test_file_shards_falls_back_to_the_file_name():
    files = pa.table({"path": ["part-00007-r1-abc.parquet", "x/part-00008-r-1-u.parquet", "other.parquet",
                               "part-00009-r1-u.parquet"],
                      "min.shard_id": [None, None, None, "00003"], "max.shard_id": [None, None, None, "00003"]})
    assert file_shards(files) == ["00007", "00008", None, "00003"]


def test_a_file_of_unknown_shard_is_removed_alone(local_out):
    out, paths = local_out
    dmg = Damage("masks", paths["masks"]["00002"], "missing", None)
    removed = repair_output(out, [dmg])
    assert [(r.table, r.paths) for r in removed] == [("masks", (paths["masks"]["00002"],))]
    assert len(DeltaTable(f"{out}/images").file_uris()) == 6


@pytest.mark.parametrize("args, words", [
    (["{tmp}/nothing"], "is not a Delta table"),
    (["s3://"], "names no bucket"),
    (["{tmp}/out", "--storage-options", "[1]"], "must be a JSON object"),
])
def test_cli_errors_are_one_line(tmp_path, args, words):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "out" / "masks").mkdir(parents=True)
    r = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


S3_OPTS = {"AWS_ALLOW_HTTP": "true", "conditional_put": "etag", "AWS_REGION": "us-east-1"}


@pytest.mark.parametrize("kind", ["truncate", "delete", "copy"])
def test_s3_damage_found_and_repaired(s3_server, s3_bucket, kind):
    out = f"{s3_bucket}/out"
    opts = {**S3_OPTS, "AWS_ENDPOINT_URL": s3_server.endpoint}
    paths = _build(out, opts, s3=True)
    table, path, reason = _damage(kind, out, paths, s3=True)
    damaged = [d for c in check_output(out, opts) for d in c.damaged]
    assert [(d.table, d.path, d.reason, d.shard_id) for d in damaged] == [(table, path, reason, "00001")]
    before = {t: DeltaTable(f"{out}/{t}", storage_options=opts).version() for t in ("images", "masks")}
    # the CLI takes fsspec options, like every job (the endpoint also comes from AWS_ENDPOINT_URL)
    r = _cli(out, "--repair", "--storage-options", json.dumps({"endpoint_url": s3_server.endpoint}))
    assert r.returncode == 0, r.stderr
    assert f"{table} {path}: {reason}" in r.stdout
    _assert_repaired(out, opts, before, {"00001"})


def test_repair_killed_between_its_two_commits_completes_when_run_again(local_out):
    """A kill after the images commit leaves the damaged masks file active: the next check finds it
    again and removes the shard's masks files (the images table has nothing left to remove)."""
    from deltalake.transaction import RemoveAction

    out, paths = local_out
    _damage("truncate", out, paths, s3=False)  # masks of shard 00001
    images = DeltaTable(f"{out}/images")
    name = paths["images"]["00001"]
    images.create_write_transaction([RemoveAction(name, True, 1_700_000_000_000, os.path.getsize(f"{out}/images/{name}"))],
                                    mode="append", schema=images.schema())
    r = _cli(out, "--repair")
    assert r.returncode == 0, r.stderr
    assert "removed 2 files from masks" not in r.stdout and "removed 1 file from masks" in r.stdout
    assert "from images" not in r.stdout
    for table in ("images", "masks"):
        assert _read(out, table, None) == _expected(table, {"00001"})
