"""One run per output: the compare-and-swap lease (pipeline/tables/lease.py) on local files and on the
S3 endpoint, with real threads and processes.

The three ways two live runs got in before, each reproduced and refused:
(a) a holder in another PID namespace with the same hostname (its pid looks dead from here);
(b) a holder paused past the TTL, then resumed beside the run that took over;
(c) a slow PUT landing after the other run's write-then-read-back window.

Run: pytest tests/test_lease.py -q
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fixtures_infra import REPO, TcpProxy, _kill_tree
from ifcn.io import filesystem
from pipeline.config import SegmentError
from pipeline.tables.lease import LEASE_FILE, STALE_S, Lease, LeaseLostError

# A run in its own process: takes the lease, says "held <token> <pid>", then obeys stdin lines
# "check" (says "ok" or "lost <message>") and "release" (says "released").
HOLDER = r"""
import json, os, sys
from pipeline.config import SegmentError
from pipeline.tables.lease import Lease, LeaseLostError
url, options, ttl_s, heartbeat_s = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
lease = Lease(url, options, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
try:
    lease.acquire()
except SegmentError as e:
    print("refused", e, flush=True)
    sys.exit(0)
print("held", lease.token, os.getpid(), flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        try:
            lease.check()
            print("ok", flush=True)
        except LeaseLostError as e:
            print("lost", e, flush=True)
    elif line.strip() == "release":
        lease.release()
        print("released", flush=True)
"""

# A racer: for each stdin line "<round> <start time>", builds a lease on <base>/r<round>, waits
# for the start time and tries to take it; says "won <round> <token>" or "lost <round> <message>".
RACER = r"""
import json, sys, time
from pipeline.config import SegmentError
from pipeline.tables.lease import Lease
base, options = sys.argv[1], json.loads(sys.argv[2])
held = []
for line in sys.stdin:
    rnd, start = line.split()
    lease = Lease(f"{base}/r{rnd}", options, ttl_s=600, heartbeat_s=600)
    time.sleep(max(0.0, float(start) - time.time()))
    try:
        lease.acquire()
        held.append(lease)
        print("won", rnd, lease.token, flush=True)
    except SegmentError as e:
        print("lost", rnd, e, flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _spawn(script: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or []), sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env(), start_new_session=True)


def _say(proc: subprocess.Popen, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _holder(url: str, ttl_s: float = STALE_S, heartbeat_s: float = 10.0, options: dict | None = None,
            prefix: list[str] | None = None) -> tuple[subprocess.Popen, str, int]:
    proc = _spawn(HOLDER, url, json.dumps(options), str(ttl_s), str(heartbeat_s), prefix=prefix)
    first = proc.stdout.readline().split()
    assert first[:1] == ["held"], first
    return proc, first[1], int(first[2])


def _stored(url: str) -> dict | None:
    """The lease as stored (one GET: an open() would HEAD first and fail when a heartbeat lands between)."""
    fs, path = filesystem(f"{url}/{LEASE_FILE}")
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _foreign(out: Path, age_s: float, host: str = "other-host", pid: int = 1) -> None:
    """A lease file as an older run on another machine left it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE_FILE).write_text(json.dumps({"token": "someone", "host": host, "pid": pid,
                                              "heartbeat": time.time() - age_s}))


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An output URL on local disk or on the S3 endpoint (a fresh bucket)."""
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/out"


def test_fresh_foreign_lease_refuses_in_one_line(tmp_path: Path) -> None:
    _foreign(tmp_path, age_s=5)
    with pytest.raises(SegmentError) as e:
        Lease(str(tmp_path)).acquire()
    msg = str(e.value)
    assert "in use by another run (host other-host, pid 1, heartbeat 5 s ago)" in msg and "\n" not in msg
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == "someone"  # untouched


def test_second_run_is_refused_while_the_first_holds_it(output: str) -> None:
    """Acquire is a create-if-absent and one read: the second run is refused at once, before it
    lists anything; the first run's lease is untouched and released on leaving the block."""
    with Lease(output) as first:
        with pytest.raises(SegmentError, match=r"in use by another run \(host .*, pid \d+, heartbeat \d+ s ago\)"):
            Lease(output).acquire()
        assert _stored(output)["token"] == first.token
        first.check()
    assert _stored(output) is None


def test_stale_lease_is_taken_over_and_released(output: str) -> None:
    old = Lease(output, ttl_s=1.0, heartbeat_s=100.0)  # a run that stops heart-beating (killed elsewhere)
    old.acquire()
    time.sleep(1.2)
    new = Lease(output, ttl_s=1.0)
    new.acquire()
    assert "past the 1 s TTL" in new.took_over and _stored(output)["token"] == new.token
    with pytest.raises(LeaseLostError, match="taken over by host"):
        old.check()
    old.release()
    assert _stored(output)["token"] == new.token
    new.release()
    assert _stored(output) is None
    new.release()  # idempotent


def test_a_longer_ttl_of_the_holder_wins(tmp_path: Path) -> None:
    """A run with a short TTL cannot call a long-TTL holder stale."""
    with Lease(str(tmp_path), ttl_s=30.0, heartbeat_s=100.0):
        time.sleep(0.3)
        with pytest.raises(SegmentError, match="in use"):
            Lease(str(tmp_path), ttl_s=0.1).acquire()


def test_killed_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """Same boot, same PID namespace, pid gone: a killed job re-run at once does not wait the TTL."""
    out = str(tmp_path / "out")
    proc, token, _ = _holder(out)
    proc.kill()
    proc.wait()
    assert _stored(out)["token"] == token  # its heartbeat is fresh
    lease = Lease(out)
    lease.acquire()
    assert "that process is gone" in lease.took_over
    lease.release()


def test_a_same_hostname_in_another_pid_namespace_is_refused(tmp_path: Path) -> None:
    """(a) A live run in a container (its own PID namespace, the same hostname): its pid does not
    exist here, which the old rule took for a dead run. It is refused now."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urp", "--fork", "true"]).returncode:
        pytest.skip("user + PID namespaces are not available here (unshare -Urp)")
    here = set(psutil.pids())
    inner = next(p for p in range(3, 500) if p not in here)  # a pid the holder gets there, free here
    # sh is pid 1 there, each /bin/true takes the next pid, python the one after
    script = "; ".join(["/bin/true"] * (inner - 2))
    out = str(tmp_path / "out")
    prefix = ["unshare", "-Urp", "--fork", "sh", "-c", f'{script}; "$@"; exit $?', "sh"]
    proc, token, pid = _holder(out, prefix=prefix)
    try:
        held = _stored(out)
        assert held["token"] == token and held["host"] == socket.gethostname()
        assert pid == inner and not psutil.pid_exists(pid)  # what the old rule saw: "dead here"
        with pytest.raises(SegmentError, match=f"in use by another run \\(host {socket.gethostname()}, pid {pid}"):
            Lease(out).acquire()
        assert _say(proc, "check") == "ok"
    finally:
        _kill_tree([proc.pid])


def test_paused_holder_loses_and_never_touches_the_new_owners_lease(output: str) -> None:
    """(b) The holder is stopped (SIGSTOP) past the TTL; another run takes over; the holder
    resumes: its heartbeat fails its precondition, check() says the lease is lost, and its
    release leaves the new owner's lease alone."""
    proc, _, _ = _holder(output, ttl_s=2.0, heartbeat_s=0.2)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        new = Lease(output, ttl_s=2.0, heartbeat_s=0.2)
        deadline = time.monotonic() + 30
        while True:
            try:
                new.acquire()
                break
            except SegmentError as e:
                assert "in use by another run" in str(e) and time.monotonic() < deadline
                time.sleep(0.2)
        assert "past the 2 s TTL" in new.took_over
        os.kill(proc.pid, signal.SIGCONT)
        answer = _say(proc, "check")
        assert answer.startswith("lost") and "taken over by host" in answer, answer
        assert _say(proc, "release") == "released"
        time.sleep(1.0)  # five of the old holder's heartbeat periods
        assert _stored(output)["token"] == new.token
        new.check()  # its own renewals kept landing: nobody wrote over them
        new.release()
        assert _stored(output) is None
    finally:
        _kill_tree([proc.pid])


class _SlowProxy(TcpProxy):
    """A TcpProxy whose requests reach the server `delay_s` late per chunk (a slow PUT)."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        self.delay_s = delay_s
        self.put_sent = threading.Event()  # a PUT reached the proxy (it reaches the server later)
        super().__init__(upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        if dst.getpeername()[1] == self.upstream[1]:
            src = _SlowSocket(src, self.delay_s, self.put_sent)
        super()._pump(src, dst)


class _SlowSocket:
    def __init__(self, sock: socket.socket, delay_s: float, put_sent: threading.Event | None = None) -> None:
        self.sock, self.delay_s, self.put_sent = sock, delay_s, put_sent

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        if data.startswith(b"PUT ") and self.put_sent is not None:
            self.put_sent.set()
        if data:
            time.sleep(self.delay_s)
        return data

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)


def test_a_slow_put_cannot_let_a_second_run_in(s3_server, s3_bucket: str) -> None:
    """(c) Run B's create takes over 1 s to reach the store; run A takes the lease meanwhile. The old
    write / wait 1 s / read back let both in (B's late PUT overwrote A after A's read-back). With
    If-None-Match B's PUT is refused by the store, however late it lands."""
    proxy = _SlowProxy(s3_server.endpoint.removeprefix("http://"), delay_s=1.2)
    slow = {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True}
    out = f"{s3_bucket}/out"
    a, b = Lease(out), Lease(out, slow)
    refused: list[SegmentError] = []

    def take_b() -> None:
        try:
            b.acquire()
        except SegmentError as e:
            refused.append(e)

    worker = threading.Thread(target=take_b)
    worker.start()
    assert proxy.put_sent.wait(timeout=60)  # B's create is on its way (headers, then body, each 1.2 s late)
    a.acquire()
    worker.join(timeout=60)
    assert len(refused) == 1 and "in use by another run" in str(refused[0])
    assert _stored(out)["token"] == a.token
    a.check()
    a.release()


class _LossyProxy(TcpProxy):
    """A TcpProxy that swallows the server's answer to the nth PUT and cuts that connection: the
    PUT took effect, the client never heard (it retries, as botocore does after a dropped connection)."""

    def __init__(self, upstream: str, nth_put: int = 1) -> None:
        self.put_on: int | None = None  # id of the client socket whose PUT's answer gets lost
        self.puts_left = nth_put
        self.dropped = 0
        super().__init__(upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        to_server = dst.getpeername()[1] == self.upstream[1]
        super()._pump(_Sniffer(src, self, id(src)) if to_server else _Sniffer(src, self, id(dst), deaf=True), dst)


class _Sniffer:
    def __init__(self, sock: socket.socket, proxy: _LossyProxy, client: int, deaf: bool = False) -> None:
        self.sock, self.proxy, self.client, self.deaf = sock, proxy, client, deaf
        self.cut = False

    def recv(self, n: int) -> bytes:
        if self.cut:
            return b""
        data = self.sock.recv(n)
        if not self.deaf and data.startswith(b"PUT ") and self.proxy.put_on is None:
            self.proxy.puts_left -= 1
            if not self.proxy.puts_left:
                self.proxy.put_on = self.client
        elif self.deaf and data and self.proxy.put_on == self.client and not self.proxy.dropped:
            # An interim "100 Continue" passes; the final answer after it is lost. On a loaded
            # machine both can arrive in one recv: pass the interim part, drop the rest.
            interim = data[:data.index(b"\r\n\r\n") + 4] if data.startswith(b"HTTP/1.1 100 ") else b""
            if len(data) > len(interim):
                self.proxy.dropped += 1
                self.cut = True  # as if the connection dropped before the answer came
                return interim
        return data

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)


def test_a_create_whose_answer_was_lost_is_still_ours(s3_server, s3_bucket: str) -> None:
    """The create PUT lands but its answer is lost; the client's retry meets If-None-Match (412):
    the lease found is our own (same token), so the run holds it instead of refusing itself."""
    proxy = _LossyProxy(s3_server.endpoint.removeprefix("http://"))
    out = f"{s3_bucket}/out"
    lease = Lease(out, {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True})
    lease.acquire()
    assert proxy.dropped == 1 and lease.took_over is None
    assert _stored(out)["token"] == lease.token
    lease.check()
    lease.release()
    assert _stored(out) is None


def test_a_renewal_whose_answer_was_lost_keeps_the_lease(s3_server, s3_bucket: str) -> None:
    """The first heartbeat lands but its answer is lost; the retry (If-Match on the old ETag) gets
    412 because the stored lease is our own newer write: the run adopts it and keeps renewing."""
    proxy = _LossyProxy(s3_server.endpoint.removeprefix("http://"), nth_put=2)
    out = f"{s3_bucket}/out"
    lease = Lease(out, {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True},
                  ttl_s=1.0, heartbeat_s=0.2)
    lease.acquire()
    deadline = time.monotonic() + 30
    while not proxy.dropped and time.monotonic() < deadline:
        time.sleep(0.1)
    first = _stored(out)["heartbeat"]
    time.sleep(1.5)  # past the TTL: only renewals that kept landing keep it
    assert proxy.dropped == 1 and _stored(out)["heartbeat"] > first
    lease.check()
    lease.release()
    assert _stored(out) is None


def test_an_unreachable_store_is_one_line(s3_server) -> None:
    with pytest.raises(SegmentError) as e:
        Lease("s3://no-such-bucket-for-the-lease/out").acquire()
    assert "cannot take the lease _lease.json (FileNotFoundError:" in str(e.value) and "\n" not in str(e.value)


def _race(base: str, options: dict | None, rounds: int) -> None:
    racers = [_spawn(RACER, base, json.dumps(options)) for _ in range(2)]
    try:
        for rnd in range(rounds):
            start = time.time() + 0.15
            for r in racers:
                r.stdin.write(f"{rnd} {start}\n")
                r.stdin.flush()
            answers = [r.stdout.readline().strip().split(maxsplit=2) for r in racers]
            winners = [a for a in answers if a[0] == "won"]
            assert len(winners) == 1, (rnd, answers)  # exactly one run holds each output
            assert _stored(f"{base}/r{rnd}")["token"] == winners[0][2]
            (loser,) = [a for a in answers if a[0] == "lost"]
            assert "in use by another run" in loser[2]
    finally:
        _kill_tree([r.pid for r in racers])


def test_two_processes_racing_exactly_one_wins_local(tmp_path: Path) -> None:
    _race(str(tmp_path / "out"), None, rounds=20)


def test_two_processes_racing_exactly_one_wins_s3(s3_server, s3_bucket: str) -> None:
    _race(f"{s3_bucket}/out", None, rounds=12)


def test_release_never_deletes_a_foreign_lease(output: str) -> None:
    """Someone else's lease replaced ours (a takeover we missed): check() raises, release leaves it."""
    lease = Lease(output, ttl_s=1.0, heartbeat_s=100.0)  # renews too rarely to keep it
    lease.acquire()
    other = Lease(output, ttl_s=1.0)
    time.sleep(1.1)
    other.acquire()
    lease.release()
    assert _stored(output)["token"] == other.token
    with pytest.raises(LeaseLostError, match="taken over by host"):
        lease.check()
    other.release()


def test_heartbeat_advances_while_held(tmp_path: Path) -> None:
    lease = Lease(str(tmp_path), heartbeat_s=0.05)
    lease.acquire()
    first = _stored(str(tmp_path))["heartbeat"]
    time.sleep(0.4)
    assert _stored(str(tmp_path))["heartbeat"] > first
    lease.check()
    lease.release()


def test_an_output_without_compare_and_swap_is_refused() -> None:
    with pytest.raises(SegmentError, match=r"no compare-and-swap lease for memory:// outputs"):
        Lease("memory://somewhere/out")


def test_prepare_refuses_before_touching_the_output(tmp_path: Path) -> None:
    """The second run must not delete the first run's shards in flight (uncommitted part files)."""
    from pipeline.config import SegmentConfig
    from pipeline.run import prepare
    from segment_helpers import write_checkpoint, write_images

    write_images(tmp_path / "images", ["a.png"])
    out = tmp_path / "out"
    in_flight = out / "segments" / "part-000000.parquet"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"being written by the first run")
    _foreign(out, age_s=1)
    config = SegmentConfig(input=str(tmp_path / "images"), output=str(out),
                           checkpoint=write_checkpoint(tmp_path / "m.pt"))
    with pytest.raises(SegmentError, match="in use by another run"):
        prepare(config, Lease(str(out)))
    assert in_flight.exists()
