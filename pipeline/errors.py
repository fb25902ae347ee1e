"""Which failures are the input's fault (final error rows) and which are the world's (retried).

Permanent: the bytes are not an image we can use (corrupt, truncated, unsupported, too large),
or the object is gone. Re-running changes nothing, so the image becomes a committed error row.
Transient: storage, network, credentials, timeouts, CUDA and out-of-memory failures. They are
retried with backoff where they happen; if they persist, the image's shard is left uncommitted
and the job exits non-zero, so re-running the same command retries exactly those shards.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from ifcn.image import ImageError

RETRY = "retry"  # in-flight status of an image that failed transiently; never written to a table
# Writes of staged fragments, tables and commit markers: 6 attempts, 1 s backoff doubling, ride out
# ~30 s of storage trouble (throttling, a restarting endpoint) before the shard is given up.
STORAGE_ATTEMPTS = 6
STORAGE_BACKOFF_S = 1.0
T = TypeVar("T")

_PERMANENT = (ImageError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure", "s3fs",
                      "gcsfs", "adlfs")


def is_transient(e: BaseException) -> bool:
    """True for failures that a later attempt may not meet (see the module docstring)."""
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, (MemoryError, OSError)):
        return True  # OSError (TimeoutError, ConnectionError, ...): network, expired credentials, throttling
    if isinstance(e, RuntimeError) and ("CUDA" in str(e) or "out of memory" in str(e)):
        return True  # torch.cuda.OutOfMemoryError is a RuntimeError too
    return type(e).__module__.split(".")[0] in _TRANSIENT_MODULES


def with_retries(fn: Callable[[], T], attempts: int, base_delay_s: float) -> T:
    """fn(), retried on transient failures with exponential backoff (base, 2x base, ...);
    permanent failures and the last transient one propagate."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts - 1 or not is_transient(e):
                raise
            time.sleep(base_delay_s * 2**attempt)
    raise AssertionError("unreachable")


def storage_call(fn: Callable[[], T]) -> T:
    """fn() (a write to the output store), retried on transient failures as STORAGE_ATTEMPTS says."""
    return with_retries(fn, STORAGE_ATTEMPTS, STORAGE_BACKOFF_S)
