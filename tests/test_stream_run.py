"""The job planning part by part on a real S3 endpoint (moto's server): shards commit while the
listing is still held, and a run killed after a part's snapshot, mid-listing after commits, or
after its last part, re-run, ends with exactly the rows of an uninterrupted run, continuing the
killed run's snapshot instead of listing again (pipeline/planning/stream.py, pipeline/planning/parts.py)."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from pipeline.tables.hooks import KILL_ENV, PAUSE_ENV
from pipeline.tables.schema import IMAGES_RESULT_COLUMNS
from segment_helpers import (REPO, cli, cli_env, inference_flags, read_table, run_killed, write_checkpoint,
                             write_images)

NUM_IMAGES = 12
PART = 2  # images per listing part: 13 images in 7 parts
SHARD_SIZE = 2

pytestmark = pytest.mark.slow


def _args(images: str, output: Path, checkpoint: str) -> list[str]:
    return ["--input", images, "--output", str(output), "--checkpoint", checkpoint, "--listing-part", str(PART),
            "--shard-size", str(SHARD_SIZE), "--actors", "1", "--batch-size", "1", "--commit-shards", "1",
            "--max-error-rate", "0.5", *inference_flags()]


@pytest.fixture(scope="module")
def job(s3_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import s3fs

    root = tmp_path_factory.mktemp("stream")
    local = root / "images"
    write_images(local, [f"img_{i:03d}.png" for i in range(NUM_IMAGES)], seed=5)
    (local / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"stream-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    fs.put(str(local) + "/", f"{bucket}/images/", recursive=True)
    checkpoint = write_checkpoint(root / "model.pt")
    images = f"s3://{bucket}/images/"
    reference = root / "reference"
    r = cli(*_args(images, reference, checkpoint))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "7 part(s)" in r.stderr, r.stderr[-2000:]  # 13 images in parts of 2
    return {"images": images, "local": str(local), "checkpoint": checkpoint, "reference": reference}


def _assert_like_reference(out: Path, reference: Path) -> None:
    cols = list(IMAGES_RESULT_COLUMNS)
    got, want = read_table(out, "images", bookkeeping=True), read_table(reference, "images")
    assert len(got) == NUM_IMAGES + 1 and not got.image_id.duplicated().any()
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True), want[cols].reset_index(drop=True))
    got_masks, want_masks = read_table(out, "masks", bookkeeping=True), read_table(reference, "masks")
    assert not got_masks.duplicated(["image_id", "rank"]).any()
    pd.testing.assert_frame_equal(got_masks.drop(columns=["shard_id", "run_id"]).reset_index(drop=True),
                                  want_masks.reset_index(drop=True))


def _commits(out: Path) -> int:
    return len(list((out / "segments" / "_delta_log").glob("*.json")))


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("_runs/*/listing/part-*.parquet"))


def _resume(args: list[str]) -> str:
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"continuing run \S+'s listing", r.stderr), r.stderr[-2000:]
    return r.stderr


def test_shards_commit_while_the_listing_is_held_and_a_kill_there_resumes(job: dict, tmp_path: Path) -> None:
    """Planning held before the 3rd part: shards of the first two parts are committed meanwhile
    (a run that listed everything first would commit nothing); killed there, the re-run continues
    the two snapshotted parts and ends with the uninterrupted rows."""
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    args = _args(job["images"], out, job["checkpoint"])
    env = {**cli_env(), PAUSE_ENV: f"before_part:3:{gate}"}
    run_killed(args, env, until=lambda: (out / "segments").exists() and _commits(out) >= 3)
    assert len(_parts(out)) == 2  # the listing never went past its 2nd part
    done = read_table(out, "images")
    assert 1 <= len(done) <= 2 * PART
    log = _resume(args)
    assert f"{len(done)} done" in log
    parts = _parts(out)
    assert len(parts) == 7 and len({p.parent for p in parts}) == 1  # continued in the killed run's folder
    _assert_like_reference(out, job["reference"])


@pytest.mark.parametrize("step", ["after_part:2", "listing_ended:1"])
def test_a_run_killed_at_a_listing_step_resumes_to_the_uninterrupted_result(job: dict, tmp_path: Path,
                                                                          step: str) -> None:
    """after_part:2: the 2nd part snapshotted, none of its shards handed over; listing_ended:1: every
    part snapshotted, vanished and prune not yet planned. The re-run reads the parts back (after the
    last one ends the listing, it lists nothing: no part is written again)."""
    out = tmp_path / "out"
    args = _args(job["images"], out, job["checkpoint"])
    assert run_killed(args, {**cli_env(), KILL_ENV: step}) == -signal.SIGKILL
    before = {p: p.stat().st_mtime_ns for p in _parts(out)}
    assert len(before) == (2 if step == "after_part:2" else 7)
    _resume(args)
    after = {p: p.stat().st_mtime_ns for p in _parts(out)}
    assert {p: after[p] for p in before} == before and len(after) == 7  # the snapshot kept, continued
    _assert_like_reference(out, job["reference"])


def test_a_local_run_killed_after_its_one_part_resumes(job: dict, tmp_path: Path) -> None:
    """A local folder is one part: killed right after its snapshot, the re-run plans from it."""
    reference, out = tmp_path / "reference", tmp_path / "out"
    r = cli(*_args(job["local"], reference, job["checkpoint"]))
    assert r.returncode == 0, r.stderr[-3000:]
    args = _args(job["local"], out, job["checkpoint"])
    assert run_killed(args, {**cli_env(), KILL_ENV: "after_part:1"}) == -signal.SIGKILL
    assert len(_parts(out)) == 1
    _resume(args)
    _assert_like_reference(out, reference)
    history = subprocess.run([sys.executable, "-m", "jobs.show", str(out), "--history"], cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert history.returncode == 0 and "continued" in history.stdout, history.stdout + history.stderr
