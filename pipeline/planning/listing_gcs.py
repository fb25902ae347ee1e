"""Listing a GCS prefix with many objects.list pages in flight, never one `find` of the whole prefix.

As on S3 (pipeline/planning/listing.py): the prefix starts as one key range, and whenever a range gets a
page back while fewer than LIST_CONCURRENCY ranges run, the rest of it is cut at interpolated keys
(`split_points`) into new ranges. objects.list bounds a range by `startOffset` (inclusive) and
`endOffset` (exclusive), so a range holds the keys k with start <= k < until. A range that was cut
keeps paging with its page token (tokens are tied to the offsets first sent, which therefore stay)
and drops what a page brings at or past its new end. Ranges partition the key space: every key is
listed once, and the pages joined by first key are the sorted listing.

A page is read by Arrow's JSON reader straight into arrays (name, etag, size): no Python object per
key. Requests go through gcsfs's own `_call`, so credentials, requester pays (`userProject`), its
retries of HTTP failures and the endpoint (`STORAGE_EMULATOR_HOST`) are gcsfs's; each page is also
retried on transient failures as S3's are.
"""
from __future__ import annotations

import asyncio
import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from pipeline.errors import with_retries_async
from pipeline.planning import listing

from .listing import Columns, Page, _columns, _join, finish_all, split_points

FIELDS = "items(name,etag,size),nextPageToken"  # the answer trimmed to what the listing keeps
_PAGE_SCHEMA = pa.schema([
    ("items", pa.list_(pa.struct([("name", pa.string()), ("etag", pa.string()),
                                  ("size", pa.string())]))),  # objects.list sends uint64 as a string
    ("nextPageToken", pa.string()),
])


def parse_gcs_page(body: bytes) -> tuple[Page, str | None]:
    """An objects.list answer (JSON) -> its keys, ETags and sizes as Arrow arrays, and the next
    page's token (None: this was the last page)."""
    table = pj.read_json(
        io.BytesIO(body),
        read_options=pj.ReadOptions(use_threads=False, block_size=len(body) + 1),  # one object, one block
        parse_options=pj.ParseOptions(explicit_schema=_PAGE_SCHEMA, newlines_in_values=True,
                                      unexpected_field_behavior="ignore"))
    if table.num_rows != 1:
        raise ValueError(f"an objects.list answer with {table.num_rows} JSON objects, expected 1: {body[:200]!r}")
    objects = table.column("items").combine_chunks().flatten()  # (n,) struct; a missing `items` is no object
    token = table.column("nextPageToken")[0].as_py()
    return Page(objects.field("name"), objects.field("etag"), objects.field("size").cast(pa.int64()),
                token is not None), token


class GCSLister:
    """Lists one prefix of a gcsfs filesystem with up to `concurrency` pages in flight."""

    def __init__(self, fs, concurrency: int = listing.LIST_CONCURRENCY, page_size: int = listing.PAGE_SIZE) -> None:
        self.fs, self.concurrency, self.page_size = fs, concurrency, page_size

    def list(self, path: str, skipped: dict[str, int] | None = None) -> Columns:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        return sync(self.fs.loop, self._list, bucket, prefix, skipped)

    async def _page(self, bucket: str, prefix: str, start: str | None, end: str | None,
                    token: str | None) -> tuple[Page, str | None]:
        """One page of keys in [start, end) below `prefix` (None: unbounded), retried as S3's are."""
        params = {"prefix": prefix or None, "startOffset": start, "endOffset": end, "pageToken": token,
                  "maxResults": self.page_size, "fields": FIELDS}  # gcsfs drops the None ones

        async def once() -> tuple[Page, str | None]:
            try:
                _, body = await self.fs._call("GET", "b/{}/o", bucket, **params)
            except FileNotFoundError:
                raise FileNotFoundError(f"gs://{bucket}: no such bucket; check the --input URL") from None
            except OSError as e:
                if str(e).startswith("Forbidden"):  # gcsfs's 403: permanent, not network trouble
                    raise PermissionError(f"gs://{bucket}/{prefix}: listing forbidden ({e}); grant "
                                          f"storage.objects.list on it to the job's credentials") from e
                raise
            return parse_gcs_page(body)

        return await with_retries_async(once, listing.LIST_ATTEMPTS, listing.LIST_BACKOFF_S)

    async def _list(self, bucket: str, prefix: str, skipped: dict[str, int] | None) -> Columns:
        """Each page becomes its image rows' columns as it arrives; the pages are joined in key order
        at the end, so the listing comes out sorted (no sort of the rows, no second copy)."""
        scheme = self.fs.unstrip_protocol(bucket).split("://")[0]  # "gs", as fs.find's paths read
        pages: list[tuple[str, list[pa.Array | None]]] = []  # (first key, the page's image rows)
        running: set[asyncio.Task] = set()
        tasks: list[asyncio.Task] = []

        async def walk(start: str | None, until: str | None) -> None:
            """Keys in [start, until): page after page; idle slots take cut-off parts of the rest."""
            end, token = until, None
            while True:
                page, token = await self._page(bucket, prefix, start, end, token)
                keys = page.keys
                if until is not None and len(keys) and keys[-1].as_py() >= until:
                    keep = pc.less(keys, until)
                    page, token = Page(keys.filter(keep), page.etags.filter(keep), page.sizes.filter(keep), False), None
                if len(page.keys):
                    pages.append((page.keys[0].as_py(), list(_columns(page.keys, page.etags, page.sizes, bucket,
                                                                      prefix, skipped, scheme=scheme))))
                if token is None:
                    return
                if not len(keys):
                    continue  # an empty page that is not the last (GCS sends them): page on
                free = self.concurrency - len(running)
                if free > 0:
                    points = split_points(keys[-1].as_py(), until, prefix, 1 + free // max(1, len(running)))
                    for a, b in zip(points, points[1:] + [until]):
                        launch(a, b)
                    if points:
                        until = points[0]

        def launch(start: str | None, until: str | None) -> None:
            task = asyncio.get_running_loop().create_task(walk(start, until))
            running.add(task)
            task.add_done_callback(running.discard)
            tasks.append(task)

        launch(None, None)
        await finish_all(tasks)
        pages.sort(key=lambda p: p[0])
        tasks.clear()  # the closures here form cycles: nothing of the pages may wait for the gc
        return _join([cols for _, cols in pages])
