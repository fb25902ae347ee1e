"""Which failures are the input's fault (final error rows) and which are the world's (retried).

Permanent: re-running changes nothing, so the image becomes a committed error row that names the
cause and the fix. The bytes are not an image we can use (corrupt, truncated, unsupported, too
large); the object is gone; it sits in an archive storage class (S3 InvalidObjectState: Glacier /
Deep Archive, restore it first); the job may not read it (AccessDenied, 403, PermissionError);
the request itself is malformed (400 InvalidArgument, InvalidRequest, ...); or the model failed
on this input (any other exception).
Transient: network, throttling, server errors, expired or refreshing credentials, timeouts, and
running out of memory (CUDA OOM, the CPU allocator, MemoryError). They are retried with backoff
where they happen; if they persist, the image is left for a re-run (a `retry` row).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, TypeVar

from ifcn.image import ImageError, one_line

RETRY = "retry"  # status of an image that failed transiently; a re-run retries exactly those
# Writes of staged fragments, data files and table commits: 6 attempts, 1 s backoff doubling, ride out
# ~30 s of storage trouble (throttling, a restarting endpoint) before the shard is given up.
STORAGE_ATTEMPTS = 6
STORAGE_BACKOFF_S = 1.0
T = TypeVar("T")

_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
# Exceptions of these libraries that carry no S3 error code are network trouble (connection
# reset, endpoint down, timeouts, no credentials yet): transient.
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure", "s3fs",
                      "gcsfs", "adlfs")
_ARCHIVED = {"InvalidObjectState"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "NotSignedUp", "InvalidPayer", "403"}
# 400s that say the request can never succeed as sent (other 400s, e.g. RequestTimeout,
# ExpiredToken, BadDigest, IncompleteBody, are the network's or the credentials' and transient;
# so is a bare 400 with no code, which is all a HEAD request gets back)
_BAD_REQUEST = {"InvalidArgument", "InvalidRequest", "InvalidURI", "InvalidObjectName", "KeyTooLongError",
                "InvalidBucketName", "InvalidStorageClass", "InvalidEncryptionAlgorithmError",
                "InvalidDigest", "InvalidRange", "MethodNotAllowed", "405"}
_GONE = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404"}
_OUT_OF_MEMORY = ("out of memory", "DefaultCPUAllocator", "can't allocate memory", "Cannot allocate memory")


def classify(e: BaseException) -> tuple[bool, str]:
    """(transient, one-line reason naming the cause and, for permanent failures, the fix).

    S3 errors are judged by their error code wherever it is: on a botocore ClientError, or on
    the exception s3fs raised from it (PermissionError for both AccessDenied and
    InvalidObjectState, OSError for 400s), whose cause is the ClientError."""
    if isinstance(e, ImageError):
        return False, e.reason
    code, message = s3_error(e)
    if code in _ARCHIVED:
        return False, (f"the object is archived (S3 InvalidObjectState: {message}); restore it from "
                       f"Glacier / Deep Archive, or exclude it from the input")
    if code in _DENIED:
        return False, (f"access denied (S3 {code}: {message}); grant s3:GetObject on it to the job's "
                       f"credentials, or exclude it from the input")
    if code in _BAD_REQUEST:
        return False, f"bad request (S3 {code}: {message}); check the key and --storage-options"
    if code in _GONE:
        return False, f"no such object (S3 {code}: {message})"
    if code is not None:
        return True, f"S3 {code}: {message}"
    detail = f"{type(e).__name__}: {one_line(e)}"
    if isinstance(e, PermissionError):
        return False, f"permission denied ({detail}); make it readable by the job's user, or exclude it"
    if isinstance(e, _MISSING):
        return False, f"no such object ({detail})"
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _OUT_OF_MEMORY)):
        return True, f"out of memory ({detail})"  # torch.OutOfMemoryError (CUDA) is a RuntimeError too
    if isinstance(e, RuntimeError) and "CUDA" in str(e):
        return True, detail
    if isinstance(e, OSError) or type(e).__module__.split(".")[0] in _TRANSIENT_MODULES:
        return True, detail  # TimeoutError, ConnectionError, EIO, endpoint down, no credentials yet
    return False, detail


def is_transient(e: BaseException) -> bool:
    """True for failures that a later attempt may not meet (see `classify`)."""
    return classify(e)[0]


def s3_error(e: BaseException | None) -> tuple[str | None, str]:
    """(S3 error code, message) of a botocore ClientError that is `e` or its explicit cause
    (s3fs raises from it); (None, "") if none. A HEAD request's error has no body: its code is the
    HTTP status ("403")."""
    for _ in range(8):
        if e is None:
            break
        response: Any = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            error = response["Error"]
            code = error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return (str(code) if code else None), one_line(Exception(error.get("Message") or str(e)))
        e = e.__cause__
    return None, ""


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


async def with_retries_async(fn: Callable[[], Awaitable[T]], attempts: int, base_delay_s: float) -> T:
    """`with_retries` for coroutines: await fn(), retried on transient failures with backoff."""
    for attempt in range(attempts):
        try:
            return await fn()
        except Exception as e:
            if attempt == attempts - 1 or not is_transient(e):
                raise
            await asyncio.sleep(base_delay_s * 2**attempt)
    raise AssertionError("unreachable")


def storage_call(fn: Callable[[], T]) -> T:
    """fn() (a write to the output store), retried on transient failures as STORAGE_ATTEMPTS says."""
    return with_retries(fn, STORAGE_ATTEMPTS, STORAGE_BACKOFF_S)
