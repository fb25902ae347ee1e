"""Faults survived with real processes: each ends with tables equal to an uninterrupted run's,
every input exactly one images row, and no image left as a final error row by the fault.

- SIGKILL of an inference actor's process and of a read task's worker mid-run (Ray restarts the
  actor and retries the task; the job finishes);
- the S3 endpoint down mid-run (a TCP proxy in front of the moto server refuses connections and
  cuts live ones while the data survives), then back: the job's retries ride it out and it finishes;
- an image whose reads fail transiently past every retry: the rest is committed, the job exits 1
  with one line, the image stays a 'retry' row, and once it reads again the same command finishes;
- a two-node Ray cluster on this machine (a head and a second `ray start --address` node, one
  CPU each): the two inference actors land on different nodes, the tables equal one node's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fixtures_infra import BIN, RayHead, TcpProxy, _kill_tree, add_worker_node
from pipeline.tables.hooks import PAUSE_ENV
from pipeline.tables.schema import IMAGES_RESULT_COLUMNS
from segment_helpers import REPO, cli, cli_env, inference_flags, read_table, write_checkpoint, write_images

NUM_IMAGES = 8  # 4 shards of 2: a kill lands between commits
SHARD_SIZE = 2
OUTAGE_S = 12  # within the job's retries: reads (READ_ATTEMPTS, each with s3fs's own retries) and writes
# (STORAGE_ATTEMPTS: ~30 s) ride it out. The one 40 s outage run of this test rode it out too, so the
# exhausted-retries path has its own test below, with an image that never reads.

pytestmark = pytest.mark.slow


def _args(images: str, output: str, checkpoint: str, actors: int = 1) -> list[str]:
    return ["--input", images, "--output", output, "--checkpoint", checkpoint, "--shard-size", str(SHARD_SIZE),
            "--actors", str(actors), "--batch-size", "1", "--commit-shards", "1", *inference_flags()]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Inputs and the uninterrupted run every fault run is compared with."""
    root = tmp_path_factory.mktemp("faults")
    images = root / "images"
    write_images(images, [f"img_{i:03d}.png" for i in range(NUM_IMAGES)], seed=7, size=(600, 900))
    checkpoint = write_checkpoint(root / "model.pt")
    reference = root / "reference"
    r = cli(*_args(str(images), str(reference), checkpoint))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "images": images, "checkpoint": checkpoint, "reference": reference}


def _last_run(out: str) -> dict:
    from pipeline.tables.delta import OutputTables

    return OutputTables(out).runs()[-1]


def _assert_same_tables(got: dict[str, pd.DataFrame], reference: Path) -> None:
    """Equal to the reference run's tables (all but `uri`, which names where the inputs live)."""
    cols = [c for c in IMAGES_RESULT_COLUMNS if c != "uri"]
    images = got["images"]
    assert len(images) == NUM_IMAGES and not images.image_id.duplicated().any()  # nothing lost or doubled
    assert (images.status == "ok").all(), images[images.status != "ok"][["image_id", "error"]].to_string()
    pd.testing.assert_frame_equal(images[cols], read_table(reference, "images")[cols])
    assert not got["masks"].duplicated(["image_id", "rank"]).any()
    pd.testing.assert_frame_equal(got["masks"].drop(columns="uri"), read_table(reference, "masks").drop(columns="uri"))


def _titles(pid: int) -> dict[int, str]:
    """pid -> process title (Ray names a worker after what it runs: 'ray::MapBatches(read_images)')."""
    import psutil

    out = {}
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            out[p.pid] = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def test_sigkill_of_an_actor_and_a_read_task_mid_run(job: dict, tmp_path: Path) -> None:
    """The actor is held at its third image until it has been killed: the kill lands mid-task
    whatever the machine's speed (its task holds the whole read block, so nothing of it was
    delivered yet); the restarted actor finds the gate open and redoes the block."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    env = {**cli_env(), PAUSE_ENV: f"actor_batch:3:{gate}"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment",
                             *_args(str(job["images"]), str(out), job["checkpoint"])],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    killed: dict[str, int] = {}
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline and len(killed) < 2:
            for pid, title in _titles(proc.pid).items():
                if "read" not in killed and title.startswith("ray::MapBatches(read_images)"):
                    os.kill(pid, signal.SIGKILL)  # a read task's worker, while it runs the task
                    killed["read"] = pid
                elif "actor" not in killed and "InferAndEncodeActor" in title \
                        and title.startswith("ray::MapWorker"):
                    os.kill(pid, signal.SIGKILL)  # the only inference actor, mid-task (held at its 3rd image)
                    killed["actor"] = pid
            time.sleep(0.005)
        gate.touch()  # the restarted actor (or, if a kill was missed, this one) goes on
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert set(killed) == {"read", "actor"}, f"killed only {killed} before the job ended"
    assert proc.returncode == 0, stderr[-3000:]
    _assert_same_tables({t: read_table(out, t) for t in ("images", "masks")}, job["reference"])
    assert not (out / "_tmp").exists() and _last_run(str(out))["complete"]


def test_s3_outage_mid_run_loses_nothing(job: dict, s3_server, s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # straight to moto, never through the proxy
    fs.put(str(job["images"]), f"{s3_bucket}/images", recursive=True)
    fs.put(job["checkpoint"], f"{s3_bucket}/model.pt")
    proxy = TcpProxy(s3_server.endpoint.removeprefix("http://"))
    env = {**cli_env(), "AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_S3": proxy.url}
    out = f"{s3_bucket}/out"
    args = _args(f"{s3_bucket}/images/", out, f"{s3_bucket}/model.pt")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            fs.invalidate_cache()
            log = f"{out}/segments/_delta_log"
            if fs.exists(log) and len([p for p in fs.ls(log) if p.endswith(".json")]) >= 2:  # fence, then a group
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job ended before its first commit"
        proxy.down()
        time.sleep(OUTAGE_S)
        proxy.up()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proxy.down()
        proxy.up()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]  # ridden out: nothing left for a re-run
    fs.invalidate_cache()
    assert _last_run(out)["complete"] and not fs.exists(f"{out}/_tmp")
    _assert_same_tables({t: read_table(out, t) for t in ("images", "masks")}, job["reference"])


def test_reads_failing_past_their_retries_are_retry_rows_and_a_rerun_finishes(job: dict, tmp_path: Path) -> None:
    """Every read of one image fails with a transient OS error (a link to /proc/self/mem, which no
    process can read from its start: EIO / EINVAL, as a flaky disk or mount would fail): the run
    commits the rest, exits 1 with one line naming the re-run, and keeps the image as a 'retry' row;
    once the file reads again the same command finishes the table, equal to the uninterrupted run's."""
    images = tmp_path / "images"
    shutil.copytree(job["images"], images)
    bad = images / "img_003.png"
    original = bad.read_bytes()
    bad.unlink()
    bad.symlink_to("/proc/self/mem")
    out = tmp_path / "out"
    args = _args(str(images), str(out), job["checkpoint"])
    r = cli(*args)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "1 image(s) failed with transient errors" in errors[0] and "re-run the same command" in errors[0]
    rows = read_table(out, "images")
    assert len(rows) == NUM_IMAGES and rows[rows.status != "ok"].image_id.tolist() == ["img_003.png"]
    assert rows.set_index("image_id").status["img_003.png"] == "retry"
    assert not _last_run(str(out))["complete"]
    bad.unlink()
    bad.write_bytes(original)
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_tables({t: read_table(out, t) for t in ("images", "masks")}, job["reference"])
    assert _last_run(str(out))["complete"]


def test_two_node_cluster_spreads_the_work_and_writes_the_same_tables(job: dict, tmp_path: Path) -> None:
    head = RayHead.start(num_cpus=1)
    try:
        worker = add_worker_node(head, num_cpus=1)
        out = tmp_path / "out"
        # two actors of 0.5 CPU (resolve_resources) could share a 1-CPU node; a spread placement group
        # (run.spread_actors) puts one on each
        args = _args(str(job["images"]), str(out), job["checkpoint"], actors=2)
        env = {**cli_env(), **head.client_env, "RAY_ADDRESS": head.gcs_address}
        r = subprocess.run([sys.executable, "-m", "jobs.segment", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "inference: 2 actor(s)" in r.stderr and "could not be spread" not in r.stderr
        listed = subprocess.run([str(BIN / "ray"), "list", "actors", "--address",
                                 head.dashboard_url, "--format", "json", "--detail", "--limit", "1000"],
                                env={**os.environ, **head.client_env}, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-2000:]
        nodes = {a["node_id"] for a in json.loads(listed.stdout) if "InferAndEncodeActor" in a.get("class_name", "")}
        assert len(nodes) == 2, f"inference actors ran on {len(nodes)} node(s)"
        _assert_same_tables({t: read_table(out, t) for t in ("images", "masks")}, job["reference"])
        _kill_tree([worker.pid])
    finally:
        head.stop()
