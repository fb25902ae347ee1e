"""Tiny inputs for the batch-job tests: a narrow random-init checkpoint and small images.

The checkpoint's last score and objectness convs are scaled up so logits sit far from 0: with
raw random init every mask probability is ~0.5, and a binarisation threshold of 0.5 would
then hinge on the last bit of float arithmetic (a test of "same RLE" must not).

torch, ifcn and PIL are imported where a checkpoint or an image is made: tests/test_table.py's
killed children import this module (for delta_options) and would otherwise load torch each time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

# Small and fast on 2 CPU cores; the same options go to the pipeline and to the reference Predictor.
INFERENCE = {"scales": (64, 96), "max_proposals": 20, "windows_per_scale": 40}
LOGIT_GAIN = 40.0  # pushes random-init logits away from the 0.5 threshold


def write_checkpoint(path: Path, seed: int = 0) -> str:
    import torch

    import ifcn

    torch.manual_seed(seed)
    model = ifcn.InstanceFCN(ifcn.ModelConfig(backbone="vgg16_narrow"))
    with torch.no_grad():
        model.score_head[2].weight.mul_(LOGIT_GAIN)
        model.objectness_head[2].weight.mul_(LOGIT_GAIN)
    url = str(path)
    ifcn.save_checkpoint(model, url)
    return url


def write_images(folder: Path, names: list[str], seed: int = 0, size: tuple[int, int] = (96, 161)) -> list[Path]:
    """Smooth random blobs (so masks have structure), sides drawn from [size[0], size[1]), saved by extension."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        h, w = (int(v) for v in rng.integers(size[0], size[1], 2))
        small = rng.random((h // 16 + 2, w // 16 + 2, 3))
        big = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
        noise = rng.integers(-20, 21, big.shape)
        image = np.clip(big.astype(np.int64) + noise, 0, 255).astype(np.uint8)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
               ".webp": "WEBP"}[path.suffix.lower()]
        Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def delta_options(url: str) -> dict[str, str] | None:
    """What deltalake needs for the tests' S3 endpoint (AWS_* env set by the s3_server fixture)."""
    if not url.startswith("s3://"):
        return None
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}


MASK_COLUMNS = ["image_id", "uri", "rank", "score", "bbox", "area", "rle", "height", "width", "scale", "shard_id",
                "run_id"]


def read_table(output: str | Path, name: str, bookkeeping: bool = False) -> pd.DataFrame:
    """A view of the output table as deltalake's own reader sees it (not the pipeline's
    read_output), sorted: "images" (one row per image, no proposals) or "masks" (one row per
    proposal, flattened here with pandas, independently of pipeline.tables.schema.masks_view); without
    `bookkeeping`, the columns that name the run and shard (they differ between two runs with
    equal results) are dropped."""
    from deltalake import DeltaTable

    url = str(output).rstrip("/")
    url = url if "://" in url else os.path.abspath(url)
    df = DeltaTable(f"{url}/segments", storage_options=delta_options(url)).to_pyarrow_dataset().to_table().to_pandas()
    if name == "images":
        df = df.drop(columns=["proposals"]).sort_values("image_id")
    else:
        assert name == "masks", name
        flat = df.explode("proposals").dropna(subset=["proposals"])
        props = pd.DataFrame(flat["proposals"].tolist(), index=flat.index)
        df = pd.concat([flat.drop(columns=["proposals"]), props], axis=1)[MASK_COLUMNS]
        df = df.astype({"rank": "int32", "area": "int64", "scale": "int32", "score": "float32"})
        df = df.sort_values(["image_id", "rank"])
    if not bookkeeping:
        df = df.drop(columns=["shard_id", "run_id"])
    return df.reset_index(drop=True)


def cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python -m jobs.segment ARGS` in a fresh process with its own local Ray (RAY_ADDRESS=local,
    so it never joins a head node some other test started)."""
    return subprocess.run([sys.executable, "-m", "jobs.segment", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, **popen)


def run_killed(args: list[str], env: dict[str, str], until=None, timeout: float = 240) -> int:
    """Runs the job in its own process group; SIGKILLs the group once `until()` holds (if given),
    and in any case once the driver has ended (the local Ray it started goes with it)."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while until is not None and time.monotonic() < deadline and proc.poll() is None and not until():
            time.sleep(0.02)
        if until is not None:
            assert proc.poll() is None, "the job ended before the kill"
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=30)
    return proc.returncode


def cli_env() -> dict[str, str]:
    """CUDA hidden: CLI runs take the CPU path on any machine, so their tables compare exactly."""
    return {**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "CUDA_VISIBLE_DEVICES": ""}


def inference_flags() -> list[str]:
    return ["--scales", ",".join(map(str, INFERENCE["scales"])), "--max-proposals", str(INFERENCE["max_proposals"]),
            "--windows-per-scale", str(INFERENCE["windows_per_scale"])]


def nest(images: list[dict], masks: list[dict]) -> "pa.Table":
    """SEGMENTS_SCHEMA rows from hand-made image rows and flat mask rows (one per proposal):
    each image's proposals nested in rank order, as the pipeline stores them."""
    import pyarrow as pa

    from pipeline.tables.schema import PROPOSAL_TYPE, SEGMENTS_SCHEMA

    rows = []
    for image in images:
        mine = sorted((m for m in masks if m["image_id"] == image["image_id"]), key=lambda m: m["rank"])
        rows.append({**dict.fromkeys(SEGMENTS_SCHEMA.names), **image,
                     "proposals": [{k: m[k] for k in PROPOSAL_TYPE.names} for m in mine]})
    return pa.Table.from_pylist(rows, schema=SEGMENTS_SCHEMA)
