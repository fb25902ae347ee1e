"""A job SIGKILLed after some (not all) shards are committed, then re-run, ends with exactly the
rows of an uninterrupted run: no row lost, none duplicated, no stray file visible to readers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.schema import IMAGES_RESULT_COLUMNS
from segment_helpers import REPO, cli, cli_env, inference_flags, read_table, write_checkpoint, write_images

NUM_IMAGES = 16
SHARD_SIZE = 2  # 8 shards: commits are spread over the run, so a kill lands between two of them


def _args(images: Path, output: Path, checkpoint: str) -> list[str]:
    return ["--input", str(images), "--output", str(output), "--checkpoint", checkpoint,
            "--shard-size", str(SHARD_SIZE), "--actors", "1", "--batch-size", "1", *inference_flags()]


def _kill_after_first_commit(args: list[str], output: Path, timeout: float = 240) -> int:
    """Starts the job in its own process group, SIGKILLs the group (driver and the local Ray it
    started) as soon as a commit marker appears; returns the number of markers at kill time."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    commits = output / "_commits"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if commits.exists() and any(p.suffix == ".json" for p in commits.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it committed a shard"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return sum(p.suffix == ".json" for p in commits.iterdir())


@pytest.mark.slow
def test_killed_job_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images, [f"img_{i:03d}.png" for i in range(NUM_IMAGES)], seed=3)
    (images / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    shards = (NUM_IMAGES + 1 + SHARD_SIZE - 1) // SHARD_SIZE

    reference = tmp_path / "reference"
    r = cli(*_args(images, reference, checkpoint))
    assert r.returncode == 0, r.stderr[-3000:]

    resumed = tmp_path / "resumed"
    committed = _kill_after_first_commit(_args(images, resumed, checkpoint), resumed)
    assert 1 <= committed < shards
    # What a killed job leaves is readable (temp files live under _tmp/) and holds the committed shards.
    markers = [json.loads(p.read_text()) for p in (resumed / "_commits").glob("*.json")]
    assert len(read_table(resumed, "images")) >= sum(m["num_images"] for m in markers) > 0

    r = cli(*_args(images, resumed, checkpoint))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{committed} shards were already committed" in r.stdout

    cols = list(IMAGES_RESULT_COLUMNS)
    got_images, want_images = read_table(resumed, "images"), read_table(reference, "images")
    assert len(got_images) == NUM_IMAGES + 1 and not got_images.image_id.duplicated().any()
    pd.testing.assert_frame_equal(got_images[cols], want_images[cols])
    got_masks, want_masks = read_table(resumed, "masks"), read_table(reference, "masks")
    assert not got_masks.duplicated(["image_id", "rank"]).any()
    pd.testing.assert_frame_equal(got_masks, want_masks)
    files = [sorted(p.name for p in (out / "masks").iterdir()) for out in (resumed, reference)]
    assert files[0] == files[1]
