"""jobs.check / pipeline.tables.check: every way an output's data file can stop holding what the log and
readers rely on is named (missing, truncated, another file copied over it, damaged in place with
its size unchanged, a doubled image, rows that are not whole), and --repair leaves a table that a
re-run makes complete again, equal to an output never damaged.

Tables are written by the pipeline's own commit path (tests/test_table.py's `commit_all`);
expected reasons come from what the test did to the files and from the store's own sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline.tables.check import check_output, repair_output
from pipeline.tables.schema import SEGMENTS_SCHEMA
from pipeline.tables.delta import OutputTables
from pipeline.tables.files import write_data_file
from segment_helpers import REPO, delta_options
from test_table import IDS, _facts, _table, commit_all

S3_OPTS = {"AWS_ALLOW_HTTP": "true", "conditional_put": "etag", "AWS_REGION": "us-east-1"}


def _files(out: str) -> list[str]:
    """Active data files, in image order (the first holds img0, img1)."""
    uri = out if "://" in out else os.path.abspath(out)
    dt = DeltaTable(f"{uri}/segments", storage_options=delta_options(uri))
    adds = pa.table(dt.get_add_actions(flatten=True)).sort_by("min.image_id")
    return adds.column("path").to_pylist()


def _fs(out: str):
    import fsspec

    s3 = out.startswith("s3://")
    return fsspec.filesystem("s3" if s3 else "file", skip_instance_cache=True), out.removeprefix("s3://")


def _damage(kind: str, out: str) -> tuple[str, str]:
    """Damages the second file (img2, img3); returns (its path, the reason check must give)."""
    fs, root = _fs(out)
    files = _files(out)
    target, path = f"{root}/segments/{files[1]}", files[1]
    size = fs.size(target)
    if kind == "truncate":
        fs.pipe_file(target, fs.cat_file(target)[: size // 2])
        return path, f"size {size // 2} != {size} (log)"
    if kind == "delete":
        fs.rm_file(target)
        return path, "missing"
    if kind == "copy":  # another file over this one, as a careless `cp` would
        other = fs.cat_file(f"{root}/segments/{files[2]}")
        fs.pipe_file(target, other)
        assert len(other) != size, "test data: the two files happened to have equal size"
        return path, f"size {len(other)} != {size} (log)"
    if kind == "flip":  # 16 bytes flipped in place: same size, footer intact, pages corrupt
        data = bytearray(fs.cat_file(target))
        data[8:24] = bytes(b ^ 0xFF for b in data[8:24])
        fs.pipe_file(target, bytes(data))
        return path, "unreadable"
    raise ValueError(kind)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.check", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


@pytest.fixture
def out(tmp_path: Path) -> str:
    out = str(tmp_path / "out")
    commit_all(out, "r1")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An output never damaged, as `out` starts: read only (each test damages its own `out`)."""
    reference = str(tmp_path_factory.mktemp("check") / "reference")
    commit_all(reference, "r1")
    return reference


def test_clean_output_passes(out: str) -> None:
    check = check_output(out)
    assert (check.files, check.images, check.damaged) == (3, len(IDS), ())
    r = _cli(out)
    assert r.returncode == 0 and "all match the log, every row whole" in r.stdout


@pytest.mark.parametrize("kind", ["truncate", "delete", "copy", "flip"])
def test_each_damage_is_named_then_repaired_and_a_rerun_completes_the_table(out: str, kind: str,
                                                                            reference: str) -> None:
    path, reason = _damage(kind, out)
    check = check_output(out)
    assert [d.path for d in check.damaged] == [path] and check.damaged[0].reason.startswith(reason)
    r = _cli(out)
    assert r.returncode == 1 and f"{path}: {reason}" in r.stdout
    r = _cli(out, "--repair")
    assert r.returncode == 0, r.stderr
    assert f"removed 1 file" in r.stdout and path in r.stdout
    assert check_output(out).damaged == ()
    left = set(_table(out).image_id)
    assert left == set(IDS) - {"img2", "img3"}  # the damaged file's images: the next run redoes them
    commit_all(out, "r2", sorted(set(IDS) - left))
    assert check_output(out).damaged == ()
    assert _facts(_table(out)) == _facts(_table(reference))


def test_a_doubled_image_and_rows_that_are_not_whole_are_found(out: str) -> None:
    """A data file committed twice under two names (its images doubled) and a file whose row says 3
    proposals but holds 1: both named, both removed by --repair in one commit."""
    tables = OutputTables(out)
    tables.fence({"run_id": "hand"}, {})
    fs, root = _fs(out)
    first = pq.read_table(f"{root}/segments/{_files(out)[0]}")
    bad = pa.Table.from_pylist([{**first.to_pylist()[0], "image_id": "zz", "num_proposals": 3}], SEGMENTS_SCHEMA)
    adds = [write_data_file(fs, root, first, "000009", "hand"), write_data_file(fs, root, bad, "000010", "hand")]
    tables.commit_group("hand", 1, adds, [], {"run_id": "hand"})
    check = check_output(out)
    reasons = sorted((d.reason, d.image_ids) for d in check.damaged)
    assert reasons == [("2 image(s) with more than one row", ("img0", "img1")),
                       ("2 image(s) with more than one row", ("img0", "img1")),
                       ("num_proposals != number of proposals for 1 image(s)", ("zz",))]
    removal = repair_output(out, check.damaged)
    assert len(removal.paths) == 3
    assert check_output(out).damaged == () and sorted(_table(out).image_id) == IDS[2:]


def test_repair_waits_for_no_run_and_is_fenced(out: str) -> None:
    """Repair takes the output's lease: while a run holds it, repair is refused in one line."""
    from pipeline.config import SegmentError
    from pipeline.tables.lease import Lease

    _damage("delete", out)
    lease = Lease(out)
    lease.acquire()
    try:
        with pytest.raises(SegmentError, match="in use by another run"):
            repair_output(out, check_output(out).damaged)
    finally:
        lease.release()
    assert repair_output(out, check_output(out).damaged) is not None
    assert DeltaTable(os.path.abspath(out) + "/segments").transaction_version("ifcn.lease") == 2


@pytest.mark.parametrize("args, words", [
    (["--output", "{tmp}/nothing"], "is not a Delta table"),
    (["--output", "s3://"], "names no bucket"),
    (["--output", "{tmp}/out", "--storage-options", "[1]"], "must be a JSON object"),
])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    (tmp_path / "nothing").mkdir()
    (tmp_path / "out" / "segments").mkdir(parents=True)
    r = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("kind", ["truncate", "flip"])
def test_s3_damage_found_and_repaired(s3_server, s3_bucket: str, kind: str) -> None:
    out = f"{s3_bucket}/out"
    commit_all(out, "r1")
    path, reason = _damage(kind, out)
    opts = {**S3_OPTS, "AWS_ENDPOINT_URL": s3_server.endpoint}
    assert [(d.path, d.reason[:len(reason)]) for d in check_output(out, opts).damaged] == [(path, reason)]
    # the CLI takes fsspec options, like every job (the endpoint also comes from AWS_ENDPOINT_URL)
    r = _cli(out, "--repair", "--storage-options", json.dumps({"endpoint_url": s3_server.endpoint}))
    assert r.returncode == 0, r.stderr
    assert f"{path}: {reason}" in r.stdout
    assert check_output(out, opts).damaged == ()
    commit_all(out, "r2", ["img2", "img3"])
    assert sorted(_table(out).image_id) == IDS
