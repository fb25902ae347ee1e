"""Starting Ray for a job so a normal run prints only what a user can act on.

    init_ray()   # connects to RAY_ADDRESS / a running cluster as ray.init() does, or starts a quiet local Ray

A local Ray starts with no dashboard and no metrics export: the per-process metrics harvester
(opencensus/OpenTelemetry) is what crashed workers that Ray Data killed at the end of a dataset
(`SIGSEGV ... RunHarvesterLoop`, `Mutex corrupt ... SIGABRT`), and a one-machine job has nobody
scraping metrics. Ray's INFO/WARNING start-up lines, Ray Data's per-operator log lines and its minimum-actors UserWarning go to Ray's log files
(/tmp/ray/session_latest/logs), not the terminal; errors still reach the job as exceptions.
On a terminal Ray Data draws its progress bars; in logs the job prints its own status line
(pipeline.progress).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

# Environment for a local Ray (set only where the user has not set it): no metrics export, no usage stats.
LOCAL_ENV = {"RAY_enable_metrics_collection": "0", "RAY_USAGE_STATS_ENABLED": "0"}
UNACTIONABLE = ("The minimum number of concurrent actors",)  # Ray Data: fewer input blocks than actors


def quiet_ray_data(tty: bool | None = None) -> None:
    """Ray Data's INFO console lines (plan, start and end, per-operator progress logs) to its log file
    only; tqdm progress bars on a terminal."""
    import ray.data

    for text in UNACTIONABLE:
        warnings.filterwarnings("ignore", message=text, category=UserWarning)
    ctx = ray.data.DataContext.get_current()
    tty = sys.stderr.isatty() if tty is None else tty
    ctx.enable_progress_bars = True  # False logs a WARNING; off a terminal the bars' log lines are filtered below
    ctx.enable_operator_progress_bars = True
    if tty:  # plain tqdm bars on the driver's terminal (Ray's tqdm_ray relays worker bars; the driver has none)
        ctx.use_ray_tqdm = False
    logger = logging.getLogger("ray.data")
    for handler in logger.handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


def init_ray() -> None:
    """ray.init() unless Ray is running; a local Ray (no RAY_ADDRESS) starts quiet (module docstring)."""
    import ray

    if ray.is_initialized():
        quiet_ray_data()
        return
    if os.environ.get("RAY_ADDRESS", "local") != "local":  # a cluster keeps its own settings
        ray.init(logging_level=logging.WARNING)
    else:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(include_dashboard=False, logging_level=logging.ERROR)
    quiet_ray_data()
