"""S3 Inventory manifests as --input (pipeline/planning/inventory.py), on a real S3 endpoint (moto's
server): CSV (gzip, URL-encoded keys), Parquet and ORC inventories give the objects' listing."""
from __future__ import annotations

import gzip
import io
import json
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from pipeline.config import SegmentError
from pipeline.planning.sources import list_inputs

pytestmark = pytest.mark.slow

SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
KEYS = ["photos/a.jpg", "photos/b c+d.PNG", "photos/ü/ñ.jpeg", "photos/notes.txt", "photos/old.jpg", "photos/gone.jpg",
        "raw/x.heic", "photos/100%.webp"] + [f"photos/many/{i:04d}.jpg" for i in range(30)]
ROWS = [  # (key, is_latest, is_delete_marker, size, etag): old.jpg has an older version, gone.jpg a delete marker
    *[(k, True, False, 100 + i, f"e{i:03d}") for i, k in enumerate(KEYS) if k not in ("photos/gone.jpg",)],
    ("photos/old.jpg", False, False, 7, "stale"), ("photos/gone.jpg", True, True, None, None),
    ("photos/gone.jpg", False, False, 9, "was")]


def _rows_table(source: str) -> pa.Table:
    return pa.table({"bucket": [source] * len(ROWS), "key": [r[0] for r in ROWS],
                     "version_id": [f"v{i}" for i in range(len(ROWS))], "is_latest": [r[1] for r in ROWS],
                     "is_delete_marker": [r[2] for r in ROWS], "size": pa.array([r[3] for r in ROWS], pa.int64()),
                     "last_modified_date": ["2026-01-01T00:00:00.000Z"] * len(ROWS),
                     "e_tag": [r[4] for r in ROWS], "storage_class": ["STANDARD"] * len(ROWS)})


def _write_inventory(fs, dest: str, source: str, fmt: str) -> str:
    """An inventory as S3 writes it: data files split in two, and manifest.json naming them."""
    table = _rows_table(source)
    halves = [table.slice(0, 20), table.slice(20)]
    files = []
    for n, part in enumerate(halves):
        key = f"inv/{source}/all/data/part-{n}.{ {'CSV': 'csv.gz', 'Parquet': 'parquet', 'ORC': 'orc'}[fmt] }"
        if fmt == "CSV":  # no header, every field quoted, keys URL-encoded, empty for nulls
            lines = []
            for r in part.to_pylist():
                fields = [r["bucket"], quote_plus(r["key"], safe="/"), r["version_id"], str(r["is_latest"]).lower(),
                          str(r["is_delete_marker"]).lower(), "" if r["size"] is None else str(r["size"]),
                          r["last_modified_date"], r["e_tag"] or "", r["storage_class"]]
                lines.append(",".join(f'"{f}"' for f in fields))
            data = gzip.compress(("\n".join(lines) + "\n").encode())
        else:
            buf = io.BytesIO()
            (pq.write_table if fmt == "Parquet" else orc.write_table)(part, buf)
            data = buf.getvalue()
        fs.pipe(f"{dest}/{key}", data)
        files.append({"key": key, "size": len(data), "MD5checksum": "0" * 32})
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{dest}", "version": "2016-11-30",
                "creationTimestamp": "1767225600000", "fileFormat": fmt, "files": files,
                "fileSchema": SCHEMA if fmt == "CSV" else "message s3.inventory { ... }"}
    url = f"{dest}/inv/{source}/all/2026-01-01T00-00Z/manifest.json"
    fs.pipe(url, json.dumps(manifest).encode())
    return f"s3://{url}"


@pytest.mark.parametrize("fmt", ["CSV", "Parquet", "ORC"])
def test_inventory_manifest_lists_the_latest_image_objects(s3_bucket: str, fmt: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    dest = s3_bucket.removeprefix("s3://")
    url = _write_inventory(fs, dest, "source-bucket", fmt)
    skipped: dict[str, int] = {}
    got = [(it.image_id, it.uri, it.etag, it.size) for it in list_inputs(url, skipped=skipped)]
    images = sorted((k, size, etag) for k, latest, marker, size, etag in ROWS
                    if latest and not marker and k.rsplit(".", 1)[-1].lower() in ("jpg", "png", "jpeg", "webp"))
    assert got == [(f"s3://source-bucket/{k}", f"s3://source-bucket/{k}", etag, size) for k, size, etag in images]
    assert len(got) == 35 and skipped == {".txt": 1, ".heic": 1}


def test_a_broken_inventory_manifest_is_one_line(s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{s3_bucket.removeprefix('s3://')}/inv/manifest.json", b'{"files": []}')
    with pytest.raises(SegmentError, match=r"not an S3 Inventory manifest\.json \(KeyError"):
        list_inputs(f"{s3_bucket}/inv/manifest.json")
