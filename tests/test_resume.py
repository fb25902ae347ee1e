"""A job SIGKILLed mid-run, then re-run, ends with exactly the rows of an uninterrupted run: no
row lost, none duplicated, no image with rows of two runs, nothing uncommitted visible to readers.
Kills come from outside (the whole process group, once the table has a first group commit) and
from the driver's own test hook before and after a group commit; tests/test_table.py repeats the
hook kills before and after every commit without Ray, on local files and on the S3 endpoint."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.tables.schema import IMAGES_RESULT_COLUMNS
from pipeline.tables.delta import KILL_ENV
from segment_helpers import REPO, cli, cli_env, inference_flags, read_table, run_killed, write_checkpoint, write_images

NUM_IMAGES = 16
SHARD_SIZE = 2  # 9 shards: commits are spread over the run, so a kill lands between two of them

pytestmark = pytest.mark.slow


def _args(images: Path, output: Path, checkpoint: str) -> list[str]:
    return ["--input", str(images), "--output", str(output), "--checkpoint", checkpoint,
            "--shard-size", str(SHARD_SIZE), "--actors", "1", "--batch-size", "1", "--commit-shards", "1",
            *inference_flags()]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    images = root / "images"
    write_images(images, [f"img_{i:03d}.png" for i in range(NUM_IMAGES)], seed=3)
    (images / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    checkpoint = write_checkpoint(root / "model.pt")
    reference = root / "reference"
    r = cli(*_args(images, reference, checkpoint), "--max-error-rate", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"images": images, "checkpoint": checkpoint, "reference": reference}


def _assert_like_reference(out: Path, reference: Path) -> None:
    cols = list(IMAGES_RESULT_COLUMNS)
    got_images, want_images = read_table(out, "images", bookkeeping=True), read_table(reference, "images")
    assert len(got_images) == NUM_IMAGES + 1 and not got_images.image_id.duplicated().any()
    pd.testing.assert_frame_equal(got_images[cols], want_images[cols])
    got_masks, want_masks = read_table(out, "masks", bookkeeping=True), read_table(reference, "masks")
    assert not got_masks.duplicated(["image_id", "rank"]).any()
    pd.testing.assert_frame_equal(got_masks.drop(columns=["shard_id", "run_id"]), want_masks)
    # no image has rows of two runs, and its masks rows are those of its images row's run
    runs = dict(zip(got_images.image_id, got_images.run_id))
    assert (got_masks.run_id == got_masks.image_id.map(runs)).all()


def test_killed_job_resumes_to_the_uninterrupted_result(job: dict, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    log = resumed / "segments" / "_delta_log"
    args = _args(job["images"], resumed, job["checkpoint"])
    # version 0 is the run's fence (no rows); version 1 its first group
    run_killed(args, cli_env(), until=lambda: log.exists() and len(list(log.glob("*.json"))) >= 2)
    # Only the driver commits, and it is dead: what the table holds now is what the re-run finds.
    done = read_table(resumed, "images")
    assert 1 <= len(done) < NUM_IMAGES + 1
    r = cli(*args, "--max-error-rate", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    already = int(re.search(r"(\d+) images were already done", r.stdout).group(1))
    assert already == len(done)  # nothing to roll forward: every commit is whole
    _assert_like_reference(resumed, job["reference"])


def test_driver_killed_at_each_commit_step_resumes_to_the_uninterrupted_result(job: dict, tmp_path: Path) -> None:
    """Right after the first group commit, then right before the next run's first group commit:
    the last run finishes with the uninterrupted rows. (tests/test_table.py kills before and after
    every commit, on local files and S3.)"""
    out = tmp_path / "out"
    args = _args(job["images"], out, job["checkpoint"])
    for step in ("after_group:1", "before_group:1"):
        assert run_killed(args, {**cli_env(), KILL_ENV: step}) == -signal.SIGKILL, step
        assert len(read_table(out, "masks")) > 0
    r = cli(*args, "--max-error-rate", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_like_reference(out, job["reference"])
    history = subprocess.run([sys.executable, "-m", "jobs.show", str(out), "--history"], cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    lines = history.stdout.strip().splitlines()
    assert history.returncode == 0 and len(lines) == 3, history.stdout + history.stderr
    assert "interrupted" in lines[0] and "interrupted" in lines[1] and "complete: done" in lines[2]
    assert "continued" in lines[1] and "continued" in lines[2]  # killed runs' listing snapshots were continued
