"""Listing a GCS prefix with many objects.list pages in flight, never one `find` of the whole prefix.

The S3 lister's engine (pipeline/planning/listing.py `RangeLister`): the prefix starts as one key
range, cut at interpolated keys while slots are free, each range (after, until] walked page by page
and the pages joined in key order, in parts as they are listed (so a GCS prefix streams into a run
as an S3 one does) and paced by the parts taken. objects.list bounds a page by `startOffset`
(inclusive) and `endOffset` (exclusive): a page asks for keys from just after `after` (`after`
+ "\0") to just after `until`, so each page is one request that needs no token of an earlier one.

A page is read by Arrow's JSON reader straight into arrays (name, etag, size): no Python object per
key. Requests go through gcsfs's own `_call`, so credentials, requester pays (`userProject`), its
retries of HTTP failures and the endpoint (`STORAGE_EMULATOR_HOST`) are gcsfs's; each page is also
retried on transient failures as S3's are.
"""
from __future__ import annotations

import io
from contextlib import asynccontextmanager

import pyarrow as pa
import pyarrow.json as pj

from pipeline.errors import with_retries_async
from pipeline.planning import listing

from .listing import Page

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


class GCSLister(listing.RangeLister):
    """Lists one prefix of a gcsfs filesystem with up to `concurrency` pages in flight: the S3
    lister's key ranges (after, until] (pipeline/planning/listing.py `RangeLister`, in parts as it
    lists), each page asked with `startOffset` just after `after` and `endOffset` just after `until`."""

    @property
    def scheme(self) -> str:
        return self.fs.unstrip_protocol("b").split("://")[0]  # "gs", as fs.find's paths read

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

    @asynccontextmanager
    async def _pages(self, bucket: str, prefix: str):
        async def fetch(after: str, until: str | None) -> Page:
            """Keys after `after` up to `until`: "\0" appended is the next string, so the offsets
            (start inclusive, end exclusive) ask for exactly (after, until]. An empty page that is
            not the last (GCS sends them) is paged on with its token, whose offsets stay."""
            start, end = (after + "\0" if after else None), (until + "\0" if until is not None else None)
            page, token = await self._page(bucket, prefix, start, end, None)
            while not len(page.keys) and token is not None:
                page, token = await self._page(bucket, prefix, start, end, token)
            return Page(page.keys, page.etags, page.sizes, token is not None)

        yield fetch
