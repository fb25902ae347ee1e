"""S3 Inventory as input: a `manifest.json` -> the image objects its data files list.

Owners of very large buckets already have a daily or weekly inventory (CSV, ORC or Parquet files
of key, size, ETag, ...): reading it replaces listing the bucket (a few files instead of 10,000
LIST pages per 10M keys). The manifest names the data files as keys of `destinationBucket` and
their columns in `fileSchema`; rows of versioned inventories that are not the latest version, or
are delete markers, are not inputs. image_id is the object's full URI, as for URI manifests, and
each row keeps the object's ETag and size, so a re-run processes only new or changed objects.
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc

from ifcn.io import open_url

from pipeline.config import SegmentError

from .listing import Columns, image_mask

FORMATS = ("CSV", "Parquet", "ORC")
_COLUMNS = {"bucket": "bucket", "key": "key", "size": "size", "etag": "e_tag", "islatest": "is_latest",
            "isdeletemarker": "is_delete_marker"}  # CSV header name (lower case) -> Parquet/ORC name


def is_inventory(url: str) -> bool:
    return url.rstrip("/").endswith("manifest.json")


def read_inventory(url: str, storage_options: dict[str, Any] | None,
                   skipped: dict[str, int] | None = None) -> Columns:
    """(image_ids, uris, etags, sizes) of the image objects an inventory manifest lists (in no
    particular order); `skipped` counts the other keys by extension."""
    with open_url(url, "rb", storage_options) as f:
        try:
            manifest = json.loads(f.read())
            fmt, files = manifest["fileFormat"], manifest["files"]
            destination = manifest["destinationBucket"].removeprefix("arn:aws:s3:::")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SegmentError(f"--input {url}: not an S3 Inventory manifest.json ({type(e).__name__}: {e}); "
                               f"pass the manifest.json S3 Inventory wrote, or a prefix or URI manifest") from None
    if fmt not in FORMATS:
        raise SegmentError(f"--input {url}: inventory format {fmt!r} is not one of {', '.join(FORMATS)}")
    names = _csv_names(manifest.get("fileSchema", "")) if fmt == "CSV" else None
    tables = [_read_file(f"s3://{destination}/{entry['key']}", fmt, names, storage_options, url) for entry in files]
    table = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in ("bucket", "key")})
    return _image_columns(table, fmt == "CSV", skipped)


def _csv_names(schema: str) -> list[str]:
    """fileSchema of a CSV inventory ("Bucket, Key, Size, ...") -> Parquet/ORC column names."""
    names = [_COLUMNS.get(n.strip().lower(), n.strip().lower()) for n in schema.split(",")]
    if "key" not in names or "bucket" not in names:
        raise SegmentError(f"CSV inventory fileSchema {schema!r} has no Bucket and Key fields")
    return names


def _read_file(uri: str, fmt: str, names: list[str] | None, storage_options: dict[str, Any] | None,
               url: str) -> pa.Table:
    wanted = ["bucket", "key", "size", "e_tag", "is_latest", "is_delete_marker"]
    with open_url(uri, "rb", storage_options) as f:
        if fmt == "CSV":
            import pyarrow.csv as csv

            stream = pa.input_stream(f, compression="gzip" if uri.endswith(".gz") else None)
            keep = [n for n in wanted if n in names]
            table = csv.read_csv(stream, read_options=csv.ReadOptions(column_names=names),
                                 convert_options=csv.ConvertOptions(
                                     include_columns=keep,
                                     column_types={n: pa.string() for n in keep if n != "size"}))
        elif fmt == "Parquet":
            import pyarrow.parquet as pq

            present = pq.ParquetFile(f).schema_arrow.names
            table = pq.read_table(f, columns=[n for n in wanted if n in present])
        else:
            import pyarrow.orc as orc

            reader = orc.ORCFile(f)
            table = reader.read(columns=[n for n in wanted if n in reader.schema.names])
    if "key" not in table.column_names or "bucket" not in table.column_names:
        raise SegmentError(f"--input {url}: inventory file {uri} has no bucket and key columns "
                           f"(columns: {table.column_names})")
    return table


def _image_columns(table: pa.Table, url_encoded: bool, skipped: dict[str, int] | None) -> Columns:
    """Inventory rows -> the image objects' columns (latest versions only, no delete markers)."""
    keep = pa.array([True] * table.num_rows) if table.num_rows else pa.array([], pa.bool_())
    if "is_latest" in table.column_names:
        keep = pc.and_(keep, pc.fill_null(_flag(table.column("is_latest")), True))
    if "is_delete_marker" in table.column_names:
        keep = pc.and_(keep, pc.invert(pc.fill_null(_flag(table.column("is_delete_marker")), False)))
    table = table.filter(keep)
    keys = table.column("key").combine_chunks().cast(pa.string())
    if url_encoded and pc.any(pc.match_substring_regex(keys, r"[%+]")).as_py():  # CSV keys are URL-encoded
        keys = pa.array([unquote_plus(k) for k in keys.to_pylist()], pa.string())
    image = image_mask(keys, skipped)
    uris = pc.binary_join_element_wise("s3://", table.column("bucket").combine_chunks().cast(pa.string()).filter(image),
                                       "/", keys.filter(image), "")
    n = len(uris)
    etags = (pc.replace_substring(table.column("e_tag").combine_chunks().cast(pa.string()).filter(image), '"', "")
             if "e_tag" in table.column_names else pa.nulls(n, pa.string()))
    sizes = (table.column("size").combine_chunks().cast(pa.int64()).filter(image)
             if "size" in table.column_names else pa.nulls(n, pa.int64()))
    return uris, uris, etags, sizes


def _flag(column: pa.ChunkedArray) -> pa.Array:
    """A boolean column, or CSV's "true"/"false" strings, as booleans."""
    column = column.combine_chunks()
    if pa.types.is_boolean(column.type):
        return column
    return pc.equal(pc.utf8_lower(column.cast(pa.string())), "true")

