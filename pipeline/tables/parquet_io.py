"""Parquet bytes in memory: what staging, publishing and the table's data files all write.

Its own module so that sink.py (stages, publishes) and table.py (commits) both use it without
importing each other both ways.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import PARQUET_COMPRESSION


def parquet_bytes(table: pa.Table, row_group_size: int | None, compression: str = PARQUET_COMPRESSION) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, row_group_size=row_group_size, write_statistics=True)
    return buf.getvalue()
