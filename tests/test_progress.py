"""Progress: a status line every few seconds in logs (not on a terminal), and Ray Data's bars when
the job runs on a terminal (a pty)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.progress import status_line, status_lines
from segment_helpers import REPO, cli_env, inference_flags, write_checkpoint, write_images


def test_status_line_counts_rate_and_time_left() -> None:
    assert status_line(120, 1000, 40.0) == "progress: 120/1000 images committed (12%), 3.00 images/s, about 5 min left"
    assert status_line(0, 10, 5.0) == "progress: 0/10 images committed (0%), 0.00 images/s"
    assert status_line(10, 10, 5.0) == "progress: 10/10 images committed (100%), 2.00 images/s"


def test_status_lines_log_while_the_block_runs_and_stop_after() -> None:
    lines: list[str] = []
    done = [0]
    with status_lines(lambda: done[0], 8, lines.append, every_s=0.05, tty=False):
        for i in range(1, 5):
            done[0] = 2 * i
            time.sleep(0.08)
    n = len(lines)
    time.sleep(0.2)
    assert n >= 3 and len(lines) == n  # none after the block
    assert all(ln.startswith("progress: ") and "/8 images committed" in ln for ln in lines)
    quiet: list[str] = []
    with status_lines(lambda: 1, 8, quiet.append, every_s=0.01, tty=True):  # a terminal: Ray Data's bars instead
        time.sleep(0.05)
    assert quiet == []


@pytest.mark.slow
def test_a_terminal_run_shows_ray_data_progress_bars(tmp_path: Path) -> None:
    """The job on a pseudo-terminal (as in tmux): Ray Data draws its bars (tqdm: 'row/s' rates and '%|' bars)."""
    import fcntl
    import pty
    import struct
    import termios

    write_images(tmp_path / "in", [f"{i}.png" for i in range(6)])
    ckpt = write_checkpoint(tmp_path / "m.pt")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120, as a terminal has
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment", "--input", str(tmp_path / "in"), "--output",
                             str(tmp_path / "out"), "--checkpoint", ckpt, "--shard-size", "2", *inference_flags()],
                            cwd=REPO, env={**cli_env(), "TERM": "xterm", "COLUMNS": "120"},
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert proc.wait(timeout=400) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "done: 6 images ok" in text
    assert "row/s" in text or "%|" in text, text[-3000:]
    assert "Traceback" not in text
