"""How long `jobs.report` takes on a large output, and how big its page is, without running the model.

    .venv/bin/python bench/report.py --images 10000      # target: < 30 s on 2 cores, page < 5 MB

Builds a synthetic output with the pipeline's own table code (pipeline.tables.delta: one data file per
shard and table, group commits with run records): small PNG inputs, 0-60 rectangular proposals
per image, ~2% error rows with a few reasons and ~1% retry rows, then times jobs.report on it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path, where bench/pipeline.py would shadow the `pipeline` package.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

H, W = 240, 320  # small photos: the report's cost is in the tables; the gallery reads only a few images
SHARD = 128
GROUP = 16  # shards per commit, as the driver groups them
REASONS = ("not a JPEG/PNG (got b'<htm'); recorded as error row", "truncated file (image file is truncated)",
           "too large: 9000x12000 px over --max-pixels")


def synthetic_output(root: Path, images: int, seed: int = 0, run_id: str = "20261129T000000-synth0") -> str:
    """root/in/*.png and root/out/segments, a Delta table like a complete jobs.segment run's."""
    from ifcn.io import filesystem
    from pipeline.tables.schema import IMAGES_SCHEMA, MASKS_SCHEMA, PROPOSAL_TYPE, SEGMENTS_SCHEMA
    from pipeline.tables.delta import OutputTables
    from pipeline.tables.files import write_data_file

    rng = np.random.default_rng(seed)
    (root / "in").mkdir(parents=True, exist_ok=True)
    out = str(root / "out")
    fs, path = filesystem(out)
    fs.makedirs(path, exist_ok=True)
    tables = OutputTables(out)
    settings = {"synthetic": True}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"run_id": run_id, "started_at": started, "settings": settings, "complete": False, "exit": "running",
              "counts": {"num_images": 0}, "skipped_keys": {".txt": 3, "": 1}}
    tables.fence(record, settings)
    rles = [mask_utils.encode(_rect(rng))["counts"].decode() for _ in range(64)]  # reused: encoding is not measured
    png = io.BytesIO()
    Image.fromarray(np.kron(rng.integers(0, 256, (H // 16, W // 16, 3)), np.ones((16, 16, 1))).astype(np.uint8)).save(
        png, format="PNG")  # one picture, written under every input name (encoding 10k PNGs is not measured)
    done, group, version = 0, [], 0
    for s, lo in enumerate(range(0, images, SHARD)):
        shard = f"{s:05d}"
        ids = [f"img/{i:07d}.png" for i in range(lo, min(images, lo + SHARD))]
        for i in ids:
            (root / "in" / Path(i).name).write_bytes(png.getvalue())
        status = rng.choice(["ok", "error", "retry"], len(ids), p=[0.97, 0.02, 0.01])
        counts = np.where(status == "ok", rng.integers(0, 61, len(ids)), 0)
        uri = [f"file://{root / 'in' / Path(i).name}" for i in ids]
        err = [None if st == "ok" else f"image {u}: {REASONS[rng.integers(len(REASONS))]}" if st == "error"
               else f"image {u}: read failed (ConnectionError: timed out)" for st, u in zip(status, uri)]
        n = int(counts.sum())
        img_of = np.repeat(np.arange(len(ids)), counts)
        rank = np.concatenate([np.arange(c) for c in counts]) if n else np.zeros(0, np.int64)
        masks = pa.table({
            "image_id": pa.array([ids[i] for i in img_of]), "uri": pa.array([uri[i] for i in img_of]),
            "rank": pa.array(rank, pa.int32()), "score": pa.array(np.sort(rng.random(n))[::-1], pa.float32()),
            "bbox": pa.array([[1.0, 2.0, 10.0, 8.0]] * n, pa.list_(pa.float32(), 4)),
            "area": pa.array(rng.integers(20, H * W, n), pa.int64()),
            "rle": pa.array([rles[k % len(rles)] for k in range(n)]), "height": pa.array([H] * n, pa.int32()),
            "width": pa.array([W] * n, pa.int32()), "scale": pa.array(rng.choice([119, 178, 267, 400, 600, 900], n),
                                                                       pa.int32()),
            "shard_id": pa.array([shard] * n), "run_id": pa.array([run_id] * n)}).cast(MASKS_SCHEMA)
        ok = status == "ok"
        imgs = pa.table({
            "image_id": ids, "uri": uri, "width": pa.array([W if o else None for o in ok], pa.int32()),
            "height": pa.array([H if o else None for o in ok], pa.int32()), "status": pa.array(status.tolist()),
            "error": pa.array(err, pa.string()), "num_proposals": pa.array(counts, pa.int32()),
            **{c: pa.array(rng.random(len(ids)) * 10, pa.float32()) for c in ("read_ms", "decode_ms", "infer_ms",
                                                                              "postprocess_ms")},
            "etag": pa.array([None] * len(ids), pa.string()), "size": pa.array([None] * len(ids), pa.int64()),
            "shard_id": [shard] * len(ids), "run_id": [run_id] * len(ids)}).cast(IMAGES_SCHEMA)
        offsets = pa.array(np.r_[0, np.cumsum(counts)], pa.int32())
        nested = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(
            [masks.column(f.name).combine_chunks().cast(f.type) for f in PROPOSAL_TYPE], fields=list(PROPOSAL_TYPE)))
        segments = imgs.append_column("proposals", nested).select(SEGMENTS_SCHEMA.names).cast(SEGMENTS_SCHEMA)
        group.append(write_data_file(fs, path, segments, shard, run_id))
        done += len(ids)
        if len(group) == GROUP or lo + SHARD >= images:
            version += 1
            record = {**record, "counts": {"num_images": done}}
            tables.commit_group(run_id, version, group, [], record)
            group = []
    tables.record(run_id, version + 1, {**record, "complete": True, "exit": "done"})
    return out


def _rect(rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((H, W), np.uint8, order="F")
    y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
    m[y:y + rng.integers(4, H - y), x:x + rng.integers(4, W - x)] = 1
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--keep", help="folder to build the output in (kept); default a temp folder")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="ifcn-report-bench-"))
    t0 = time.perf_counter()
    out = synthetic_output(root, args.images)
    build_s = time.perf_counter() - t0
    from jobs.report import main as report

    html = root / "report.html"
    t1 = time.perf_counter()
    rc = report(["--output", out, "--html", str(html)])
    report_s = time.perf_counter() - t1
    print(json.dumps({"images": args.images, "build_s": round(build_s, 1), "report_s": round(report_s, 2),
                      "page_mb": round(html.stat().st_size / 1e6, 3), "rc": rc}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
