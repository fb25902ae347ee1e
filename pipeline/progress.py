"""A one-line status every few seconds while a job runs, for logs (a terminal gets Ray Data's bars).

    with status_lines(lambda: committer.counts["num_images"], total=1000, log=print):
        ...   # prints e.g. "progress: 120/1000 images committed (12%), 3.4 images/s, about 4 min left"
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

EVERY_S = 30.0  # between status lines


def status_line(done: int, total: int, elapsed_s: float) -> str:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    left = "" if not rate or done >= total else f", about {_duration((total - done) / rate)} left"
    share = f" ({done / total:.0%})" if total else ""
    return f"progress: {done}/{total} images committed{share}, {rate:.2f} images/s{left}"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


@contextmanager
def status_lines(done: Callable[[], int], total: int | Callable[[], int], log: Callable[[str], None],
                 every_s: float = EVERY_S, tty: bool | None = None) -> Iterator[None]:
    """Logs status_line every `every_s` from a daemon thread while the block runs; nothing on a terminal
    (Ray Data's progress bars are there) unless tty=False. `total` may grow (a callable: the images
    planned so far, while the input is still listed)."""
    if (sys.stderr.isatty() if tty is None else tty) or every_s <= 0:
        yield
        return
    stop = threading.Event()
    start = time.monotonic()

    def loop() -> None:
        while not stop.wait(every_s):
            log(status_line(done(), total() if callable(total) else total, time.monotonic() - start))

    thread = threading.Thread(target=loop, name="ifcn-status", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)
