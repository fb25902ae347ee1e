"""Listing an Azure Blob prefix (adlfs) page by page, its sub-prefixes in parallel, never one `find`.

Azure's List Blobs has no start-after bound (its marker is opaque), so a prefix cannot be cut at
interpolated keys as on S3 and GCS. It is walked with delimiter "/" (its own blobs, and its
sub-prefixes), level after level while fewer than LIST_CONCURRENCY sub-prefixes were found (up to
DESCEND_LEVELS), and each sub-prefix of the last level is then listed flat, page by page, with up
to LIST_CONCURRENCY listings in flight. Blobs that sit in one folder gain nothing from this.
Pages go through adlfs's own BlobServiceClient (its credentials, SAS token, account URL), each
page retried on transient failures as S3's are; a page's blobs become Arrow columns at once.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import with_retries_async
from pipeline.planning import listing

from .listing import Columns, _columns, _join

DESCEND_LEVELS = 4  # "/" levels walked to find sub-prefixes (images/2026/12/06/ is 3 below images/)


class AzureLister:
    """Lists one prefix of an adlfs filesystem with up to `concurrency` sub-prefix listings in flight."""

    def __init__(self, fs, concurrency: int = listing.LIST_CONCURRENCY, page_size: int = listing.PAGE_SIZE) -> None:
        self.fs, self.concurrency, self.page_size = fs, concurrency, page_size

    def list(self, path: str, skipped: dict[str, int] | None = None) -> Columns:
        from fsspec.asyn import sync

        container, key, _ = self.fs.split_path(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        return sync(self.fs.loop, self._list, container, prefix, skipped)

    async def _pages(self, listed: Callable[[], Any], each_page: Callable[[list], None]) -> None:
        """Every page of `listed()` (an SDK listing), one request at a time; a failed page is asked
        again from its continuation token."""
        token = None
        while True:
            async def one() -> tuple[list, str | None]:
                pages = listed().by_page(continuation_token=token)
                page = [item async for item in await pages.__anext__()]
                return page, pages.continuation_token

            items, token = await with_retries_async(one, listing.LIST_ATTEMPTS, listing.LIST_BACKOFF_S)
            each_page(items)
            if not token:
                return

    async def _list(self, container: str, prefix: str, skipped: dict[str, int] | None) -> Columns:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import BlobProperties

        scheme = self.fs.unstrip_protocol(container).split("://")[0]  # "abfs", as fs.find's paths read
        client = self.fs.service_client.get_container_client(container)
        pages: list[tuple[str, list[pa.Array | None]]] = []  # (first key, the page's image rows)
        subs: list[str] = []  # the sub-prefixes the current level's walks found

        def blobs(items: list) -> None:
            files = [b for b in items if isinstance(b, BlobProperties) and not _is_folder(b)]
            subs.extend(p.name for p in items if not isinstance(p, BlobProperties))  # BlobPrefix (walks)
            if files:
                etags = pc.replace_substring(pa.array([b.etag for b in files], pa.string()), '"', "")
                pages.append((files[0].name, list(_columns(pa.array([b.name for b in files], pa.string()), etags,
                                           pa.array([b.size for b in files], pa.int64()), container, prefix,
                                           skipped, scheme=scheme))))

        slots = asyncio.Semaphore(self.concurrency)

        async def walk(sub: str) -> None:
            async with slots:
                await self._pages(lambda: client.walk_blobs(name_starts_with=sub or None, delimiter="/",
                                                            include=["metadata"], results_per_page=self.page_size),
                                  blobs)

        async def flat(sub: str) -> None:
            async with slots:
                await self._pages(lambda: client.list_blobs(name_starts_with=sub, include=["metadata"],
                                                            results_per_page=self.page_size),
                                  blobs)

        async def each(fn: Callable[[str], Any], subs: list[str]) -> None:
            tasks = [asyncio.ensure_future(fn(sub)) for sub in subs]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()

        try:
            level = [prefix]
            for _ in range(DESCEND_LEVELS):
                await each(walk, level)
                level = sorted(subs)
                subs.clear()
                if not level or len(level) >= self.concurrency:
                    break
            await each(flat, level)
        except ResourceNotFoundError:
            raise FileNotFoundError(f"{scheme}://{container}: no such container; check the --input URL") from None
        pages.sort(key=lambda p: p[0])
        cols = _join([c for _, c in pages])
        ids = cols[0]
        if len(ids) > 1 and not pc.all(pc.less(ids[:-1], ids[1:])).as_py():  # the prefix's own blobs lie
            order = pc.sort_indices(ids)  # among its sub-prefixes' keys: one page may span several
            cols = tuple(c.take(order) for c in cols)  # type: ignore[assignment]
        return cols


def _is_folder(blob) -> bool:
    """A folder marker, as adlfs's find tells them (its metadata says so): not a file of the listing."""
    metadata = blob.metadata or {}
    return metadata.get("is_directory") == "true" or "true" in (metadata.get("hdi_isfolder"),
                                                                  metadata.get("Hdi_isfolder"))
