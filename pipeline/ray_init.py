"""Starting Ray for a job so a normal run prints only what a user can act on.

    init_ray()   # connects to RAY_ADDRESS / a running cluster as ray.init() does, or starts a quiet local Ray

A local Ray starts with no dashboard and no metrics export (a one-machine job has nobody scraping
metrics; the `SIGSEGV ... opencensus ... RunHarvesterLoop` traces came from that exporter thread),
and keeps idle workers for the job instead of making them exit: the `Mutex corrupt ... SIGABRT`
traces were Ray workers crashing in their own idle-exit path (INTENDED_SYSTEM_EXIT "idle for a long
time", then the abort in a background thread), after their tasks were done, so the tables were
right; neither is this project's code. Ray's INFO/WARNING start-up lines, Ray Data's per-operator log lines and its minimum-actors UserWarning go to Ray's log files
(/tmp/ray/session_latest/logs), not the terminal; errors still reach the job as exceptions.
On a terminal Ray Data draws its progress bars; in logs the job prints its own status line
(pipeline.progress).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

# Environment for a local Ray (set only where the user has not set it): no metrics export, no usage stats.
LOCAL_ENV = {"RAY_enable_metrics_collection": "0", "RAY_USAGE_STATS_ENABLED": "0",
             # idle workers are not made to exit mid-job: Ray 2.60's idle-exit path aborted with
             # "Mutex corrupt" in a background thread (seen in session logs of workers that had run only
             # Ray Data's get_table_block_metadata_schema tasks; metrics export off made no difference)
             "RAY_idle_worker_killing_time_threshold_ms": "3600000"}
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


def init_ray(log: Callable[[str], None] | None = None) -> None:
    """ray.init() unless Ray is running; a local Ray (no RAY_ADDRESS, or RAY_ADDRESS=local) starts quiet
    (module docstring). Logs one line saying which: Ray's own INFO lines are off."""
    import ray

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if ray.is_initialized():
        quiet_ray_data()
        return
    if os.environ.get("RAY_ADDRESS", "local") != "local":  # a cluster keeps its own settings
        ray.init(logging_level=logging.WARNING)
        log(f"ray: joined the running cluster at {ray.get_runtime_context().gcs_address}")
    else:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(include_dashboard=False, logging_level=logging.ERROR)
        log(f"ray: started a local Ray ({ray.cluster_resources().get('CPU', 0):g} CPU, "
            f"{ray.cluster_resources().get('GPU', 0):g} GPU); its logs: /tmp/ray/session_latest/logs")
    quiet_ray_data()
