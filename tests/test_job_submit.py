"""`ray job submit` against a real Ray head node (GCS, raylet, dashboard job API) on loopback.

This is how users run the job on a cluster: the CLI packages --working-dir, the head runs
the entrypoint as the job's driver, and the driver's Ray Data actors run on the cluster.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ifcn
from ifcn.data.synth import SynthConfig, render_image

from fixtures_infra import ray_job_submit

pytestmark = pytest.mark.slow


def test_head_runs_a_submitted_job(ray_head):
    code = "import json, ray; ray.init(); print('RESOURCES', json.dumps(ray.cluster_resources()))"
    r = ray_job_submit(ray_head, [sys.executable, "-c", code], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESOURCES"))
    resources = json.loads(line.split(" ", 1)[1])
    assert resources["CPU"] == 2.0  # the fixture's head (--num-cpus=2), not some other cluster
    assert "succeeded" in r.stdout


def test_segment_job_via_ray_job_submit(ray_head, tmp_path):
    pytest.importorskip("pipeline.run", reason="jobs.segment's pipeline is not there yet")
    from pipeline import read_output
    from pipeline.tables.delta import OutputTables

    inputs = tmp_path / "images"
    (inputs / "nested").mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = ["000000.png", "000001.png", "nested/000002.png"]
    for image_id in ids:
        image, _ = render_image(rng, SynthConfig(size=96))
        Image.fromarray(image).save(inputs / image_id)
    (inputs / "truncated.png").write_bytes((inputs / "000000.png").read_bytes()[:300])
    torch.manual_seed(0)  # random init: the job's plumbing is under test, not the weights
    ckpt = tmp_path / "model.pt"
    ifcn.save_checkpoint(ifcn.InstanceFCN(ifcn.ModelConfig(backbone="vgg16_narrow")), str(ckpt))
    out = tmp_path / "out"

    r = ray_job_submit(ray_head, [sys.executable, "-m", "jobs.segment", "--input", str(inputs), "--output", str(out),
                                  "--checkpoint", str(ckpt), "--scales", "64,96", "--max-proposals", "20",
                                  "--shard-size", "2", "--actors", "1", "--max-error-rate", "0.5"], timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "ray: joined the running cluster at" in r.stdout  # the driver joined the head, no local Ray
    assert "done: 3 images ok, 1 errors" in r.stdout

    images = read_output(str(out), "images").to_pylist()  # the Delta tables' committed rows
    masks = read_output(str(out), "masks")
    assert sorted(row["image_id"] for row in images) == sorted([*ids, "truncated.png"])
    by_id = {row["image_id"]: row for row in images}
    assert by_id["truncated.png"]["status"] == "error" and "truncated.png" in by_id["truncated.png"]["error"]
    for image_id in ids:
        assert by_id[image_id]["status"] == "ok" and 0 < by_id[image_id]["num_proposals"] <= 20
        assert (by_id[image_id]["width"], by_id[image_id]["height"]) == (96, 96)
    assert masks.num_rows == sum(row["num_proposals"] for row in images)
    assert set(masks.column("image_id").to_pylist()) == set(ids)
    record = OutputTables(str(out)).runs()[-1]  # the run's record, from the tables' commit metadata
    assert record["totals"]["images"] == 4 and record["totals"]["proposals"] == masks.num_rows
    assert record["checkpoint_sha256"] == ifcn.checkpoint_digest(str(ckpt))
    assert record["complete"] and record["exit"] == "done"

