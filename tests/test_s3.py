"""Object storage end to end: a real S3 HTTP endpoint (moto server on loopback) and s3fs.

Inputs are listed from s3://bucket/images/, the checkpoint is read from S3, and the Delta
tables are written to s3://bucket/out/ by the real CLI (a subprocess starting its own local
Ray), then read back with deltalake and compared with ifcn.Predictor on the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import ifcn
from ifcn.data.synth import SynthConfig, render_image
from ifcn.image import ImageError, decode_image, read_bytes

from fixtures_infra import REPO

pytestmark = pytest.mark.slow

SCALES = (64, 96)
MAX_PROPOSALS = 20


def s3fs_client():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def narrow_model(seed: int = 0) -> ifcn.InstanceFCN:
    """Random init (no trained weights needed: the test compares two paths on the same weights)."""
    torch.manual_seed(seed)
    return ifcn.InstanceFCN(ifcn.ModelConfig(backbone="vgg16_narrow")).eval()


def upload_inputs(bucket: str, num_images: int = 4) -> dict[str, bytes]:
    """Synthetic PNGs (one in a sub-folder) plus one corrupt file -> {image_id: bytes}."""
    rng = np.random.default_rng(0)
    files = {}
    for i in range(num_images):
        image, _ = render_image(rng, SynthConfig(size=96))
        files[f"{'sub/' if i == 0 else ''}{i:06d}.png"] = png(image)
    files["broken.jpg"] = b"<html>503 Slow Down</html>"
    fs = s3fs_client()
    for image_id, data in files.items():
        fs.pipe(f"{bucket}/images/{image_id}".removeprefix("s3://"), data)
    return files


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    # A fresh local Ray per run: RAY_ADDRESS must not send the job to some other cluster. CUDA hidden:
    # the tables are compared exactly with a CPU Predictor's, so the run takes the CPU path on any machine.
    clean = {**{k: v for k, v in env.items() if k != "RAY_ADDRESS"}, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "jobs.segment", *args], cwd=REPO, env=clean,
                          capture_output=True, text=True, timeout=600)


def read_table(url: str, storage_options: dict | None = None):
    """A Delta table on the endpoint through deltalake (credentials from the fsspec options, else AWS_* env)."""
    from deltalake import DeltaTable

    so = storage_options or {}
    endpoint = so.get("client_kwargs", {}).get("endpoint_url") or os.environ["AWS_ENDPOINT_URL"]
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": so.get("key", "testing"), "AWS_SECRET_ACCESS_KEY": so.get("secret", "testing")}
    return DeltaTable(url, storage_options=options).to_pyarrow_dataset().to_table()


def check_against_predictor(bucket: str, files: dict[str, bytes], model: ifcn.InstanceFCN, out: str,
                            storage_options: dict | None = None) -> None:
    segments = read_table(f"{out}/segments", storage_options)
    images = segments.drop_columns(["proposals"]).to_pylist()
    masks = segments.to_pandas().explode("proposals").dropna(subset=["proposals"]).reset_index(drop=True)
    masks = masks.drop(columns=["proposals"]).join(pd.DataFrame(masks.proposals.tolist(), index=masks.index))
    assert sorted(r["image_id"] for r in images) == sorted(files)  # exactly one row per input
    by_id = {r["image_id"]: r for r in images}
    bad = by_id["broken.jpg"]
    assert bad["status"] == "error" and bad["num_proposals"] == 0
    assert f"{bucket}/images/broken.jpg" in bad["error"] and "b'<htm'" in bad["error"]
    assert set(masks.image_id) == set(files) - {"broken.jpg"}

    predictor = ifcn.Predictor(model, ifcn.InferenceConfig(scales=SCALES, max_proposals=MAX_PROPOSALS), device="cpu")
    for image_id, data in files.items():
        if image_id == "broken.jpg":
            continue
        row = by_id[image_id]
        assert row["status"] == "ok" and row["error"] is None
        assert row["uri"] == f"{bucket}/images/{image_id}"
        assert (row["height"], row["width"]) == (96, 96)
        expected = predictor.predict(decode_image(data, image_id))
        got = masks[masks.image_id == image_id].sort_values("rank")
        assert row["num_proposals"] == len(got) == len(expected) > 0
        assert list(got["rank"]) == list(range(len(expected)))
        np.testing.assert_allclose(got["score"].to_numpy(), [p["score"] for p in expected], rtol=1e-4, atol=1e-5)
        # Same weights, same bytes, same CPU ops: the masks themselves must agree.
        assert list(got["rle"]) == [p["rle"]["counts"] for p in expected]
        np.testing.assert_allclose(np.stack(got["bbox"].to_numpy()), [p["bbox"] for p in expected], atol=1e-3)
        assert list(got["area"]) == [p["area"] for p in expected]
        assert set(got["scale"]) <= set(SCALES)
        assert (got["height"] == 96).all() and (got["width"] == 96).all()


# ---------------------------------------------------------------------------- the endpoint itself

def test_endpoint_speaks_s3_over_http(s3_server, s3_bucket):
    fs = s3fs_client()
    fs.pipe(f"{s3_bucket}/a/b.bin".removeprefix("s3://"), b"\x00\x01payload")
    with ifcn.io.open_url(f"{s3_bucket}/a/b.bin", "rb") as f:
        assert f.read() == b"\x00\x01payload"
    assert fs.ls(s3_bucket.removeprefix("s3://") + "/a") == [s3_bucket.removeprefix("s3://") + "/a/b.bin"]
    # It really is the loopback server: a client pointed elsewhere does not see the object.
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert s3_server.endpoint.startswith("http://127.0.0.1:")


def test_checkpoint_roundtrip_over_s3(s3_bucket):
    model = narrow_model(seed=3)
    url = f"{s3_bucket}/models/ifcn.pt"
    ifcn.save_checkpoint(model, url, extra={"step": 7})
    assert not s3fs_client().exists(url.removeprefix("s3://") + ".tmp")  # atomic write left no temp file
    loaded = ifcn.load_checkpoint(url)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    payload = ifcn.models.checkpoint.read_checkpoint(url)
    assert payload["extra"] == {"step": 7}
    assert ifcn.checkpoint_digest(url) == hashlib.sha256(s3fs_client().cat(url.removeprefix("s3://"))).hexdigest()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ifcn.load_checkpoint(f"{s3_bucket}/models/missing.pt")


def test_read_bytes_and_decode_over_s3(s3_bucket):
    image = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    s3fs_client().pipe(f"{s3_bucket}/img/x.png".removeprefix("s3://"), png(image))
    data = read_bytes(f"{s3_bucket}/img/x.png")
    np.testing.assert_array_equal(decode_image(data, f"{s3_bucket}/img/x.png"), image)
    with pytest.raises(ImageError, match=r"img/gone\.png: no such file"):
        read_bytes(f"{s3_bucket}/img/gone.png")


def test_prefix_listing_pages_through_s3(s3_bucket):
    """A prefix is listed in ListObjectsV2 pages (in parallel key ranges): every key below it once,
    neither sibling prefixes that share its letters nor folder placeholders."""
    from pipeline.planning.listing import S3Lister
    from pipeline.planning.sources import list_inputs

    fs = s3fs_client()
    bucket = s3_bucket.removeprefix("s3://")
    keys = ["images/a.jpg", "images/sub/b.PNG", "images/sub/deep/c.jpeg", "images/notes.txt", "images/README",
            "images/folder/", "images/x.heic", "images/z.webp", "images2/e.jpg", "imagesX.jpg", "other/f.jpg"]
    fs.pipe({f"{bucket}/{k}": b"x" for k in keys})
    below = sorted(f"{bucket}/{k}" for k in keys if k.startswith("images/") and not k.endswith("/"))
    images = [p for p in below if posixpath.splitext(p)[1].lower() in (".jpg", ".png", ".jpeg", ".webp")]
    for page_size in (1, 2, 3, 1000):  # 7 files: several pages, a last page that is full, one page
        uris = S3Lister(fs, 8, page_size).list(f"{bucket}/images")[1].to_pylist()
        assert sorted(uris) == [f"s3://{p}" for p in images], page_size
    # what fs.find (the old listing) gave, less the placeholder it reported as a file
    assert below == sorted(p for p in fs.find(f"{bucket}/images", withdirs=False) if not p.endswith("/"))
    for url in (f"{s3_bucket}/images", f"{s3_bucket}/images/"):
        skipped: dict[str, int] = {}
        listing = list_inputs(url, skipped=skipped)
        assert [(it.image_id, it.uri) for it in listing] == [
            (k, f"s3://{bucket}/images/{k}") for k in ("a.jpg", "sub/b.PNG", "sub/deep/c.jpeg", "z.webp")]
        # each key's version as S3 gives it (ETag without quotes, size)
        assert [(it.etag, it.size) for it in listing] == [
            (fs.info(f"{bucket}/images/{k}")["ETag"].strip('"'), 1) for k in ("a.jpg", "sub/b.PNG", "sub/deep/c.jpeg",
                                                                             "z.webp")]
        assert skipped == {".txt": 1, "": 1, ".heic": 1}


# ---------------------------------------------------------------------------- the job on S3

def test_segment_cli_reads_and_writes_s3(s3_server, s3_bucket):
    pytest.importorskip("pipeline.run", reason="jobs.segment's pipeline is not there yet")
    files = upload_inputs(s3_bucket)
    model = narrow_model()
    ifcn.save_checkpoint(model, f"{s3_bucket}/ckpt/model.pt")
    out = f"{s3_bucket}/out"
    args = ["--input", f"{s3_bucket}/images/", "--output", out, "--checkpoint", f"{s3_bucket}/ckpt/model.pt",
            "--scales", ",".join(map(str, SCALES)), "--max-proposals", str(MAX_PROPOSALS),
            "--shard-size", "2", "--actors", "1", "--max-error-rate", "0.5"]  # one input is corrupt on purpose
    r = run_cli(args, dict(os.environ))  # endpoint and credentials from AWS_* (set by the fixture)
    assert r.returncode == 0, r.stderr[-4000:]
    check_against_predictor(s3_bucket, files, model, out)

    fs = s3fs_client()
    from pipeline.tables.delta import OutputTables

    record = OutputTables(out).runs()[-1]  # the run's record, from the images table's commit metadata
    assert record["checkpoint_sha256"] == ifcn.checkpoint_digest(f"{s3_bucket}/ckpt/model.pt")
    assert record["totals"]["images"] == len(files) and record["totals"]["images_error"] == 1
    assert record["complete"] and record["exit"] == "done"

    # Re-running the same command resumes: every image is done, no data file is rewritten.
    data = lambda: {p: fs.info(p)["LastModified"] for p in fs.find(out.removeprefix("s3://") + "/segments")  # noqa: E731
                    if p.endswith(".parquet") and "_delta_log" not in p}
    before = data()
    r = run_cli(args, dict(os.environ))
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"{len(files)} images were already done" in r.stdout
    assert data() == before
    check_against_predictor(s3_bucket, files, model, out)


def test_segment_cli_with_storage_options_only(s3_server, s3_bucket):
    """No AWS_* in the environment at all: endpoint and keys reach every Ray worker via JSON."""
    pytest.importorskip("pipeline.run", reason="jobs.segment's pipeline is not there yet")
    files = upload_inputs(s3_bucket, num_images=2)
    model = narrow_model(seed=1)
    ifcn.save_checkpoint(model, f"{s3_bucket}/m.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull  # no ~/.aws fallback either
    so = s3_server.storage_options
    out = f"{s3_bucket}/out2"
    r = run_cli(["--input", f"{s3_bucket}/images", "--output", out, "--checkpoint", f"{s3_bucket}/m.pt",
                 "--scales", ",".join(map(str, SCALES)), "--max-proposals", str(MAX_PROPOSALS),
                 "--shard-size", "8", "--actors", "1", "--max-error-rate", "0.5", "--storage-options", json.dumps(so)],
                env)
    assert r.returncode == 0, r.stderr[-4000:]
    check_against_predictor(s3_bucket, files, model, out, storage_options=so)


def test_segment_cli_names_the_unreachable_input(s3_server, s3_bucket):
    pytest.importorskip("pipeline.run", reason="jobs.segment's pipeline is not there yet")
    ifcn.save_checkpoint(narrow_model(), f"{s3_bucket}/m.pt")
    r = run_cli(["--input", f"{s3_bucket}/nothing-here/", "--output", f"{s3_bucket}/o",
                 "--checkpoint", f"{s3_bucket}/m.pt"], dict(os.environ))
    assert r.returncode != 0
    assert f"{s3_bucket}/nothing-here/" in r.stderr and "Traceback" not in r.stderr

