"""One run per output: a compare-and-swap lease on OUT/_lease.json.

The store decides who holds the lease, not a read-back: the lease is created only if absent and
renewed, taken over or released only if the stored version is still the one its writer last saw
(S3: PutObject If-None-Match / If-Match and DeleteObject If-Match on the ETag; GCS: generation
preconditions; local files: an flock'd compare, then link or rename). Of two runs racing for it,
the store lets exactly one write win, however long each request takes.

A live run renews its heartbeat from a daemon thread. Another run takes the lease over only when
that heartbeat is older than the TTL (the larger of the two runs' TTLs), or at once when the
holder's process is provably gone: same boot and same PID namespace, and no such pid. A run whose
renewal fails its precondition (it was paused past the TTL and another run took over) has lost the
lease for good: it never writes or deletes the lease again, and `check()`, which the driver calls
before every commit, raises LeaseLostError. Clocks of the machines sharing an output must agree
to well within the TTL (NTP does).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Protocol

from ifcn.image import one_line
from ifcn.io import filesystem

from pipeline.config import SegmentError
from pipeline.errors import s3_error

LEASE_FILE = "_lease.json"
LOCK_FILE = ".lease.lock"  # local outputs only: the flock that makes compare-and-swap atomic there
HEARTBEAT_S = 10.0  # how often a live run renews its lease
STALE_S = 60.0  # a lease not renewed for this long belongs to a dead or stalled run (6 missed heartbeats)
ACQUIRE_ROUNDS = 5  # create / read / take over rounds before giving up; each lost round means it changed hands


class LeaseLostError(SegmentError):
    """Another run took this run's lease (it was paused or cut off past the TTL): stop writing."""


class _Slot(Protocol):
    """One object with compare-and-swap on an opaque version (ETag, generation, content hash)."""

    def read(self) -> tuple[bytes, str] | None: ...
    def create(self, body: bytes) -> str | None: ...  # the new version, or None if it exists
    def replace(self, body: bytes, version: str) -> str | None: ...  # None if `version` is not current
    def delete(self, version: str) -> bool: ...  # False if `version` is not current


class Lease:
    """Holds an output's lease for one run: `acquire`, `check` before each commit, `release`
    (or use it as a context manager)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, ttl_s: float = STALE_S,
                 heartbeat_s: float = HEARTBEAT_S, now: Callable[[], float] = time.time) -> None:
        self.url, self.ttl_s, self.heartbeat_s, self.now = url, ttl_s, heartbeat_s, now
        self.slot = _slot(url, storage_options)
        self.token = uuid.uuid4().hex
        self.took_over: str | None = None  # whose stale lease acquire() took, for the run's log
        self._version: str | None = None  # the version we last wrote; None when not held
        self._beat_at = 0.0  # the heartbeat time in that version (our clock)
        self._lost: str | None = None
        self._lock = threading.Lock()  # one store write at a time: the heartbeat thread, check(), release()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lease or raises SegmentError (one line) naming the run that holds it. A few
        small requests, whatever the input's size: take it before listing the input."""
        try:
            self._acquire()
        except SegmentError:
            raise
        except Exception as e:  # storage down, no such bucket, no permission
            raise SegmentError(f"--output {self.url}: cannot take the lease {LEASE_FILE} ({type(e).__name__}: "
                               f"{one_line(e)}); check the URL, credentials and --storage-options") from None
        self._thread = threading.Thread(target=self._beat, name="ifcn-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raises LeaseLostError (one line) unless this run still provably holds the lease."""
        with self._lock:
            if self._version is None and self._lost is None:
                raise SegmentError(f"--output {self.url}: the lease is not held (acquire it first)")
            if self._lost is None and self.now() - self._beat_at >= self.ttl_s - self.heartbeat_s:
                # renewals have not landed lately (a pause, a storage outage): ask the store now
                with contextlib.suppress(Exception):
                    self._renew()
            age = self.now() - self._beat_at
            if self._lost is None and age >= self.ttl_s:
                self._lost = f"not renewed for {age:.0f} s, past the {self.ttl_s:.0f} s TTL"
            if self._lost is not None:
                raise LeaseLostError(f"--output {self.url}: this run lost its lease ({self._lost}); it stops "
                                     f"writing; re-run once the other run is done")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours (idempotent); a lease
        another run took over is never touched."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 30)
            self._thread = None
        with self._lock:
            version, self._version = self._version, None
            if version is None or self._lost is not None:
                return
            try:
                if not self.slot.delete(version):
                    held = self._held()  # our own renewal may have landed after its request failed
                    if held is not None and held[0].get("token") == self.token:
                        self.slot.delete(held[1])
                    elif held is not None:
                        self._lost = f"taken over by {_holder(held[0], self.now())}"
            except Exception:  # storage down: the lease goes stale and the next run takes it over
                pass

    # ------------------------------------------------------------------ internals

    def _acquire(self) -> None:
        for _ in range(ACQUIRE_ROUNDS):
            record = self._record()
            body = _encode(record)
            version = self.slot.create(body)
            if version is None:
                held = self._held()
                if held is None:
                    continue  # released between our create and our read
                if held[0].get("token") == self.token:  # our create landed; its answer was lost (a retried PUT)
                    self._won(held[0], held[1])
                    return
                reason = self._stale(held[0])
                if reason is None:
                    raise SegmentError(_in_use(self.url, held[0], self.now()))
                version = self.slot.replace(body, held[1])
                if version is None:
                    continue  # it changed hands while we looked: look again
                self.took_over = reason
            self._won(record, version)
            return
        raise SegmentError(f"--output {self.url}: the lease changed hands {ACQUIRE_ROUNDS} times while this "
                           f"run tried to take it; another run is starting; retry when it is done")

    def _won(self, record: dict[str, Any], version: str) -> None:
        self._version, self._beat_at, self._lost = version, float(record["heartbeat"]), None
        self._stop.clear()

    def _stale(self, held: dict[str, Any]) -> str | None:
        """Why `held` may be taken over, or None while its run may be alive."""
        age = self.now() - _float(held.get("heartbeat"))
        ttl = max(self.ttl_s, _float(held.get("ttl_s")))  # a run with a short TTL cannot steal a long one
        who = f"host {held.get('host')}, pid {held.get('pid')}"
        if age >= ttl:
            return f"{who}: heartbeat {age:.0f} s ago, past the {ttl:.0f} s TTL"
        if _gone_here(held):
            return f"{who}: that process is gone (same boot and PID namespace as this one)"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._version is None or self._lost is not None:
                    return
                with contextlib.suppress(Exception):  # storage trouble: next beat retries; check() watches the TTL
                    self._renew()

    def _renew(self) -> None:
        """One conditional renewal (caller holds self._lock); a failed precondition loses the lease
        unless the stored lease is our own write."""
        record = self._record()
        version = self.slot.replace(_encode(record), self._version)
        if version is not None:
            self._version, self._beat_at = version, float(record["heartbeat"])
            return
        held = self._held()
        if held is not None and held[0].get("token") == self.token:  # our earlier renewal landed late
            self._version, self._beat_at = held[1], _float(held[0].get("heartbeat"))
            return
        self._lost = "deleted by someone else" if held is None else f"taken over by {_holder(held[0], self.now())}"

    def _record(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "pid_ns": _pid_ns(),
                "boot_id": _boot_id(), "heartbeat": self.now(), "ttl_s": self.ttl_s}

    def _held(self) -> tuple[dict[str, Any], str] | None:
        got = self.slot.read()
        if got is None:
            return None
        try:
            record = json.loads(got[0])
        except ValueError:
            record = {}  # unreadable: no heartbeat, so stale at once
        return (record if isinstance(record, dict) else {}), got[1]


def _holder(held: dict[str, Any], now: float) -> str:
    return (f"host {held.get('host')}, pid {held.get('pid')}, "
            f"heartbeat {now - _float(held.get('heartbeat')):.0f} s ago")


def _in_use(url: str, held: dict[str, Any], now: float) -> str:
    return (f"--output {url} is in use by another run ({_holder(held, now)}); wait for it to finish, "
            f"or use another --output")


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return 0.0


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _gone_here(held: dict[str, Any]) -> bool:
    """The holder ran in this very process table (same boot, same PID namespace) and its pid is
    gone: a killed run re-run at once. A pid seen from another namespace (a container with the
    same hostname) proves nothing, so without both ids this is never true."""
    if held.get("boot_id") is None or held.get("pid_ns") is None:
        return False
    if (held.get("boot_id"), held.get("pid_ns")) != (_boot_id(), _pid_ns()):
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError, TypeError):
        return False
    return False


# ---------------------------------------------------------------------- stores

def _slot(url: str, storage_options: dict[str, Any] | None) -> _Slot:
    fs, root = filesystem(url, storage_options)
    path = f"{root.rstrip('/')}/{LEASE_FILE}"
    protocols = set(fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    if protocols & {"file", "local"}:
        return _LocalSlot(path)
    if protocols & {"s3", "s3a"}:
        return _S3Slot(fs, path)
    if protocols & {"gs", "gcs"}:
        return _GcsSlot(fs, path)
    raise SegmentError(f"--output {url}: no compare-and-swap lease for {'/'.join(sorted(protocols))}:// outputs; "
                       f"use a local path, s3:// or gs://")


class _LocalSlot:
    """Local (and NFS) files. Each compare-and-swap runs under an exclusive flock on a sidecar
    file: the kernel grants it to one process at a time (across PID namespaces too, since it locks
    the inode) and drops it when its holder dies, so no stale lock is ever left behind. Under it,
    create links a complete temp file to the name (link fails if the name exists: never a
    half-written lease) and replace renames one over it; reads need no lock (rename is atomic)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, body: bytes) -> str | None:
        with self._locked():
            tmp = self._temp(body)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        return _digest(body)

    def replace(self, body: bytes, version: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            os.replace(self._temp(body), self.path)
        return _digest(body)

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return False
            os.unlink(self.path)
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def _temp(self, body: bytes) -> str:
        tmp = os.path.join(self.folder, f".{LEASE_FILE}.{uuid.uuid4().hex[:12]}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _S3Slot:
    """S3 (and S3-compatible stores that honour conditional writes): PutObject If-None-Match: *
    creates, PutObject / DeleteObject If-Match: <ETag> replace and delete; the store answers 412
    when the condition fails (409 ConditionalRequestConflict when two conditional writes cross)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return await resp["Body"].read(), resp["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, version: str) -> str | None:
        return self._put(body, IfMatch=version)

    def delete(self, version: str) -> bool:
        return _conditional(lambda: self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key,
                                                    IfMatch=version)) is not None

    def _put(self, body: bytes, **condition: str) -> str | None:
        out = _conditional(lambda: self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body,
                                                   **condition), gone_fails="IfMatch" in condition)
        return None if out is None else out["ETag"]


def _conditional(call: Callable[[], Any], gone_fails: bool = True) -> Any:
    """call()'s answer, or None when the store refused it because its condition did not hold. For
    a replace or delete conditional on a version, a 404 (the object is gone) is such a refusal; for
    a create it means no such bucket and propagates."""
    try:
        return call()
    except FileNotFoundError:
        if gone_fails:
            return None
        raise
    except Exception as e:
        if _condition_failed(e):
            return None
        raise


def _condition_failed(e: BaseException) -> bool:
    """A store's "your condition did not hold": S3 412 PreconditionFailed or 409
    ConditionalRequestConflict (s3fs raises FileExistsError or OSError, caused by the
    ClientError), GCS 412 (gcsfs's HttpError)."""
    if isinstance(e, FileExistsError):
        return True
    code, _ = s3_error(e)
    if code is not None:
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "409", "412")
    return getattr(e, "code", None) == 412


class _GcsSlot:
    """GCS via gcsfs's JSON API calls with generation preconditions (ifGenerationMatch=0 creates;
    =<generation> replaces and deletes; 412 when it fails). Written to the GCS API; not tested
    here (no GCS endpoint in the test rig)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, str] | None:
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None
        return data, str(headers["x-goog-generation"])

    def create(self, body: bytes) -> str | None:
        return self._upload(body, "0")

    def replace(self, body: bytes, version: str) -> str | None:
        return self._upload(body, version)

    def delete(self, version: str) -> bool:
        return _conditional(lambda: self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key,
                                                 ifGenerationMatch=version)) is not None

    def _upload(self, body: bytes, generation: str) -> str | None:
        url = f"{self.fs._location}/upload/storage/v1/b/{self.bucket}/o"
        out = _conditional(lambda: self.fs.call("POST", url, uploadType="media", name=self.key,
                                                ifGenerationMatch=generation, data=body, json_out=True,
                                                headers={"Content-Type": "application/json"}),
                           gone_fails=generation != "0")
        return None if out is None else str(out["generation"])
