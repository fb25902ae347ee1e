"""Ctrl-C on a running ifcn-segment: one line, exit 130, the lease released, and a re-run finishes
the job (committed rows kept). SIGINT is sent to the job's whole process group, as a terminal's
Ctrl-C does (Ray's local processes included)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tables.lease import Lease
from segment_helpers import REPO, cli, cli_env, inference_flags, read_table, write_checkpoint, write_images

MESSAGE = "ifcn-segment: interrupted; committed rows are kept, re-run the same command to resume"


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_a_rerun_resumes(tmp_path: Path) -> None:
    images = tmp_path / "in"
    write_images(images, [f"{i:03d}.png" for i in range(12)])
    ckpt = write_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    args = ["--input", str(images), "--output", str(out), "--checkpoint", ckpt, "--shard-size", "2",
            *inference_flags()]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # wait for the plan's line (the lease is held from before it), then interrupt mid-run
    deadline = time.monotonic() + 240
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if line.startswith("inference:") or not line:
            break
    assert any(s.startswith("inference:") for s in seen), seen
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # the foreground group, as Ctrl-C
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == MESSAGE
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert Lease(str(out))._held() is None  # released: the next run need not wait for it to go stale
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    rows = read_table(out, "images")
    assert sorted(rows["image_id"].unique()) == [f"{i:03d}.png" for i in range(12)] and len(rows) == 12
