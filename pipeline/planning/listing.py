"""Listing a prefix: the image keys below it as four Arrow columns (image_id, uri, etag, size).

On S3 the prefix is listed with many ListObjectsV2 pages in flight: it starts as one key range,
and whenever a range gets a page back while fewer than LIST_CONCURRENCY ranges run, the rest of
it is cut at interpolated keys into new ranges (`StartAfter`), so dense parts of the key space
keep splitting until the slots are full, whatever the key names. Ranges partition the key space
exactly (a range holds keys k with after < k <= until), so every key is listed once. Each page
is filed under the range it covers; once the ranges from the start join up without a gap, they
can go out as a `Part` while the rest is still being listed (`RangeLister.parts`: what lets shards
start before the listing ends, pipeline/planning/stream.py).

The listing runs only so far ahead of its consumer (`Pace`): a range parks once AHEAD_PARTS
parts' rows are listed between the frontier and it (its slot goes to ranges nearer the frontier)
and resumes once the frontier nears it, and every range waits while QUEUED_PARTS parts are
emitted but not taken. A slow consumer (a run's actors, hours behind a 10M-key listing) thus holds
the lister to a few AHEAD_PARTS of rows (ranges cut off below parked ones fill their gaps too:
~3.5x measured, bench/scale.py synthparts), not the bucket; a fast one (a re-run with nothing to
do) lists at full speed.

Pages are fetched by presigned URL with aiohttp and read with regular expressions straight into
Arrow arrays: botocore's own parsing costs ~74 ms of CPU per page of 1000 keys (dates, dicts),
which caps a 2-core driver at ~10,000 keys/s however many pages are in flight; this costs ~1 ms.

Other filesystems go through `fs.find` one prefix at a time, gathered into the same columns
LIST_CHUNK keys at a time; GCS and Azure do not come here (pipeline/planning/listers.py).
"""
from __future__ import annotations

import asyncio
import html
import posixpath
import re
from collections.abc import Awaitable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncContextManager, Callable
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import is_transient

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
LIST_CHUNK = 100_000  # keys of a prefix gathered as Python strings before they become Arrow arrays (fs.find path)
LIST_CONCURRENCY = 64  # ListObjectsV2 pages in flight (64 x 1000 keys / 200 ms = 320,000 keys/s at most)
PAGE_SIZE = 1000  # S3's largest page
LIST_ATTEMPTS = 5  # a page is retried 4 times, 0.5 + 1 + 2 + 4 s apart
LIST_BACKOFF_S = 0.5
PART_ROWS = 100_000  # image rows per listing part (`RangeLister.parts`): 100 parts, snapshots and plans per 10M keys
# The first part is one page's worth, and each next one twice the last until PART_ROWS: the first
# shards need only the first page, not the first 100k keys, which one range walks at ~5,000 keys/s.
FIRST_PART_ROWS = 1000
AHEAD_PARTS = 8  # rows listed past the frontier (not yet joinable into parts) before far-ahead ranges park
QUEUED_PARTS = 2  # rows emitted in parts the consumer has not taken before every range waits
SPLIT_DIGITS = 8  # key characters after a range's common prefix used to place split points
_BASE = 96  # digits: printable ASCII 0x20..0x7e -> 0..94, anything above -> 95 (order kept)
_EXT = r"[^/.][^/]*(?P<ext>\.[^./]*)$"  # posixpath.splitext's extension of a basename (leading dots are not one)
_COLUMN_TYPES = (pa.string(), pa.string(), pa.string(), pa.int64())

Columns = tuple[pa.Array, pa.Array, pa.Array, pa.Array]  # image_ids, uris, etags, sizes


def is_image_path(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_prefix(fs, path: str, skipped: dict[str, int] | None = None) -> Columns:
    """(image_ids, uris, etags, sizes) of the image keys below `path` (ids relative to it), in no
    particular order; `skipped` counts the other keys by extension."""
    if hasattr(fs, "_call_s3"):
        return S3Lister(fs).list(path, skipped)
    return _list_with_find(fs, path, skipped)


def version(info: dict) -> tuple[str | None, int | None]:
    """(etag, size) of an object from its listing entry: the S3/GCS ETag, else the local mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag is None and info.get("mtime") is not None:
        etag = f"mtime:{int(float(info['mtime']) * 1e9)}"
    size = info.get("size", info.get("Size"))
    return (str(etag).strip('"') if etag is not None else None), (int(size) if size is not None else None)


def _list_with_find(fs, path: str, skipped: dict[str, int] | None) -> Columns:
    """`fs.find` below `path`, gathered LIST_CHUNK keys at a time into Arrow arrays."""
    chunks: list[list[pa.Array]] = [[] for _ in _COLUMN_TYPES]
    rows: list[list] = [[] for _ in _COLUMN_TYPES]

    def flush() -> None:
        for chunk, values, t in zip(chunks, rows, _COLUMN_TYPES):
            chunk.append(pa.array(values, t))
            values.clear()

    for p, info in fs.find(path, withdirs=False, detail=True).items():
        if p.endswith("/"):
            continue
        if is_image_path(p):
            for values, v in zip(rows, (posixpath.relpath(p, path), fs.unstrip_protocol(p), *version(info))):
                values.append(v)
            if len(rows[0]) == LIST_CHUNK:
                flush()
        elif skipped is not None:
            ext = posixpath.splitext(p)[1].lower()
            skipped[ext] = skipped.get(ext, 0) + 1
    flush()
    return tuple(pa.concat_arrays(c) for c in chunks)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- S3: key ranges in parallel

@dataclass(frozen=True)
class Page:
    keys: pa.Array  # string: the page's keys (url-decoded)
    etags: pa.Array  # string, quotes stripped
    sizes: pa.Array  # int64
    truncated: bool


class ListingError(Exception):
    """A LIST request S3 answered with an error (its code and message, as botocore names them)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"S3 {code} ({status}): {message}")
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


def parse_page(body: bytes) -> Page:
    """A ListObjectsV2 response body -> its keys, ETags and sizes as Arrow arrays."""
    keys = re.findall(rb"<Key>([^<]*)</Key>", body)
    etags = re.findall(rb"<ETag>([^<]*)</ETag>", body)
    sizes = re.findall(rb"<Size>([0-9]+)</Size>", body)
    if not len(keys) == len(etags) == len(sizes):
        raise ValueError(f"a ListObjectsV2 page with {len(keys)} keys, {len(etags)} ETags and {len(sizes)} sizes")
    url_encoded = b"<EncodingType>url</EncodingType>" in body
    key_array = pa.array(keys, pa.binary()).cast(pa.string())
    # only pages with an escaped key go through Python, key by key
    if pc.any(pc.match_substring_regex(key_array, "[%+&]" if url_encoded else "&")).as_py():
        unescape = (lambda k: unquote_plus(html.unescape(k))) if url_encoded else html.unescape  # noqa: E731
        key_array = pa.array([unescape(k) for k in key_array.to_pylist()], pa.string())
    etag_array = pc.replace_substring(pc.replace_substring(pa.array(etags, pa.binary()).cast(pa.string()),
                                                           "&quot;", ""), '"', "")
    return Page(key_array, etag_array, pa.array(sizes, pa.binary()).cast(pa.string()).cast(pa.int64()),
                b"<IsTruncated>true</IsTruncated>" in body)


def split_points(after: str, until: str | None, prefix: str, n: int) -> list[str]:
    """Up to n - 1 keys strictly between `after` and `until` (None: the end of `prefix`), increasing,
    spread evenly over the key space between them (after their common prefix, SPLIT_DIGITS
    characters read as base-96 digits). Any keys do as split points: ranges stay a partition."""
    if until is None:
        common = prefix
    else:
        common = posixpath.commonprefix([after, until])
    lo = _digits(after[len(common):])
    hi = _digits(until[len(common):]) if until is not None else _BASE ** SPLIT_DIGITS
    points, last = [], after
    for k in range(1, n):
        key = common + _key(lo + (hi - lo) * k // n)
        if key > last and (until is None or key < until):
            points.append(key)
            last = key
    return points


def _digits(s: str) -> int:
    v = 0
    for i in range(SPLIT_DIGITS):
        d = min(max(ord(s[i]) - 0x20, 0), _BASE - 1) if i < len(s) else 0
        v = v * _BASE + d
    return v


def _key(v: int) -> str:
    chars = []
    for _ in range(SPLIT_DIGITS):
        v, d = divmod(v, _BASE)
        chars.append(chr(d + 0x20))
    return "".join(reversed(chars)).rstrip(" ") or " "


@dataclass(frozen=True)
class Part:
    """Listed keys in (after, until] (until None: to the end of the prefix) as image-row columns:
    parts come out in key order and follow each other (a part's `after` is the previous `until`)."""

    columns: Columns
    after: str
    until: str | None

    def __len__(self) -> int:
        return len(self.columns[0])


class Pace:
    """How far `RangeLister.parts` lists ahead of its consumer, in image rows: `ahead` rows past the
    frontier before ranges beyond them park, `queued` rows emitted and not taken before all wait.
    `take` is called from the consumer's thread; the rest runs on the listing's event loop."""

    def __init__(self, ahead: int, queued: int) -> None:
        self.ahead, self.queued = ahead, queued
        self.waiting = 0  # rows emitted, not yet taken
        self.room: asyncio.Event | None = None  # set while waiting < queued (made on the loop)
        self.wake: Callable[[], None] = lambda: None  # resumes parked ranges (set by the listing)
        self.loop: asyncio.AbstractEventLoop | None = None

    def emitted(self, rows: int) -> None:
        self.waiting += rows
        if self.waiting >= self.queued:
            self.room.clear()

    def take(self, rows: int) -> None:
        """The consumer took a part of `rows` rows (any thread)."""
        self.loop.call_soon_threadsafe(self._taken, rows)

    def _taken(self, rows: int) -> None:
        self.waiting -= rows
        if self.waiting < self.queued:
            self.room.set()
        self.wake()


class RangeLister:
    """Lists one prefix of an fsspec filesystem as key ranges (after, until] with up to `concurrency`
    pages in flight (the module's docstring): the engine shared by the S3 and GCS listers, which
    only say how a page of keys after `after` is fetched (`_pages`)."""

    scheme = "s3"  # of the URIs made from the keys

    def __init__(self, fs, concurrency: int | None = None, page_size: int | None = None) -> None:
        self.fs = fs
        self.concurrency, self.page_size = concurrency or LIST_CONCURRENCY, page_size or PAGE_SIZE

    def list(self, path: str, skipped: dict[str, int] | None = None) -> Columns:
        """The whole prefix, sorted (one part)."""
        from fsspec.asyn import sync

        parts: list[Part] = []
        sync(self.fs.loop, self._list, *self._where(path), skipped, parts.append, "", None)
        return parts[0].columns

    def parts(self, path: str, skipped: dict[str, int] | None = None, start_after: str = "",
              part_rows: int = PART_ROWS, pace: Pace | None = None) -> Iterator[Part]:
        """The prefix's keys after `start_after` as key-ordered parts of `part_rows` image rows (the
        first ones fewer: FIRST_PART_ROWS, doubling; the last one whatever is left; 0: whatever each
        page completes), each yielded as soon as every key up to its end has been listed, while the
        rest is still being listed (on the filesystem's event loop, not this thread), at most `pace`
        ahead of the parts taken (default: AHEAD_PARTS and QUEUED_PARTS parts of `part_rows`)."""
        import queue

        pace = pace or Pace(AHEAD_PARTS * max(part_rows, FIRST_PART_ROWS), QUEUED_PARTS * max(part_rows, 1))
        pace.loop = self.fs.loop
        out: queue.Queue = queue.Queue()  # the loop's callback never blocks: `pace` bounds what waits here
        done = object()
        future = asyncio.run_coroutine_threadsafe(
            self._list(*self._where(path), skipped, out.put, start_after, part_rows, pace), self.fs.loop)
        future.add_done_callback(lambda _: out.put(done))
        try:
            while (part := out.get()) is not done:
                pace.take(len(part))
                yield part
            future.result()  # raises the listing's error
        finally:
            future.cancel()

    def _where(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, f"{key.rstrip('/')}/" if key else ""

    def _pages(self, bucket: str, prefix: str) -> AsyncContextManager[Callable[[str, str | None], Awaitable[Page]]]:
        """A context in which `fetch(after, until)` returns the page of keys below `prefix` after
        `after` (it may hold keys past `until`: they are dropped), retried as LIST_ATTEMPTS says."""
        raise NotImplementedError

    async def _list(self, bucket: str, prefix: str, skipped: dict[str, int] | None, emit: Callable[[Part], None],
                    start_after: str, part_rows: int | None, pace: Pace | None = None) -> None:
        """Each page becomes its image rows' columns as it arrives (the raw page is dropped), filed
        under the key range it covers; the ranges covered from `start_after` on without a gap are
        joined in key order and emitted as a part once they hold `part_rows` rows (None: only at
        the end, the whole listing). Parts come out sorted (no sort, no second copy of them).
        With `pace`, a range whose next page lies `pace.ahead` rows or more past the frontier parks
        (`parked`) until the frontier nears it, and every range waits while `pace.room` is clear."""
        covered: dict[str, tuple[str | None, list[pa.Array | None]]] = {}  # range start -> (end, image rows)
        ahead = [0]  # image rows in `covered`
        parked: dict[str, str | None] = {}  # start -> end of ranges left until the frontier nears them
        ended = [False]  # the listing is over (done, failed or cancelled): no range starts any more
        ready: list[list[pa.Array | None]] = []  # ranges joined to the frontier, not yet emitted
        frontier: list[str | None] = [start_after]  # every key <= frontier[0] has been listed
        part_after = [start_after]
        size = [min(part_rows or 0, FIRST_PART_ROWS)]  # rows of the next part: doubling up to part_rows
        running: set[asyncio.Task] = set()

        def cover(after: str, end: str | None, cols: list[pa.Array | None]) -> None:
            """Keys in (after, end] are listed: move the frontier over every range now joined to it,
            and emit what it passed in parts of `part_rows` (0: all of it, now), each ending at
            its last key; the rest waits for more (or is the last part, at the end)."""
            covered[after] = (end, cols)
            ahead[0] += len(cols[0])
            while frontier[0] is not None and frontier[0] in covered:
                end, cols = covered.pop(frontier[0])
                ahead[0] -= len(cols[0])
                ready.append(cols)
                frontier[0] = end
            final = frontier[0] is None
            if not final and (part_rows is None or sum(len(c[0]) for c in ready) < size[0]):
                return
            joined = _join(ready)
            ready.clear()
            n, start = len(joined[0]), 0
            while part_rows and n - start >= size[0]:  # (ids are keys less the prefix)
                until = prefix + joined[0][start + size[0] - 1].as_py()
                out(Part(tuple(c.slice(start, size[0]) for c in joined), part_after[0], until))
                part_after[0], start = until, start + size[0]
                size[0] = min(part_rows, 2 * size[0])
            rest = tuple(c.slice(start) for c in joined)
            if final or part_rows == 0:
                out(Part(rest, part_after[0], frontier[0]))
                part_after[0] = frontier[0]
            elif n > start:
                ready.append(list(rest))

        def out(part: Part) -> None:
            if pace is not None:
                pace.emitted(len(part))
            emit(part)

        def far(key: str) -> bool:
            """Whether `pace.ahead` rows or more are listed between the frontier and `key`."""
            if pace is None or ahead[0] < pace.ahead:
                return False
            return sum(len(cols[0]) for a, (_, cols) in covered.items() if a < key) >= pace.ahead

        def resume() -> None:
            """Starts parked ranges, nearest first, while slots are free and they are not far."""
            for a in sorted(parked):
                if ended[0] or len(running) >= self.concurrency or far(a):
                    return
                start(a, parked.pop(a))

        if pace is not None:
            pace.room, pace.wake = asyncio.Event(), resume
            pace.room.set()

        async with self._pages(bucket, prefix) as fetch:
            async def walk(after: str, until: str | None) -> None:
                """Keys in (after, until]; then its slot goes to a parked range, before this task is
                done (a done callback could run after the listing has seen every task done)."""
                await pages(after, until)
                running.discard(asyncio.current_task())
                resume()

            async def pages(after: str, until: str | None) -> None:
                """Keys in (after, until]: page after page; idle slots take cut-off parts of the rest."""
                while True:
                    if pace is not None:
                        await pace.room.wait()  # the consumer is QUEUED_PARTS behind
                    page = await fetch(after, until)
                    keys = page.keys
                    done = not page.truncated or not len(keys)
                    if until is not None and len(keys) and keys[-1].as_py() >= until:
                        keep = pc.less_equal(keys, until)
                        page = Page(keys.filter(keep), page.etags.filter(keep), page.sizes.filter(keep), False)
                        done = True
                    cover(after, until if done else keys[-1].as_py(),
                          list(_columns(page.keys, page.etags, page.sizes, bucket, prefix, skipped, self.scheme)))
                    if done:
                        return
                    after = keys[-1].as_py()
                    if far(after):  # its slot goes to ranges nearer the frontier; resumed when it nears
                        parked[after] = until
                        return
                    free = self.concurrency - len(running)
                    if free > 0:
                        # (at least one: with more ranges running than slots free, `free // running`
                        # would be 0 and the listing would stay at about half its concurrency)
                        pieces = 1 + max(1, free // max(1, len(running)))
                        points = split_points(after, until, prefix, pieces)
                        for a, b in zip(points, points[1:] + [until]):
                            start(a, b)
                        if points:
                            until = points[0]

            def start(after: str, until: str | None) -> None:
                task = asyncio.get_running_loop().create_task(walk(after, until))
                running.add(task)
                task.add_done_callback(running.discard)  # (a walk that failed or was cancelled)
                tasks.append(task)

            tasks: list[asyncio.Task] = []
            start(start_after, None)
            try:
                await finish_all(tasks)
            finally:
                ended[0] = True
        if parked:
            raise AssertionError(f"listing ended with ranges parked: {sorted(parked)[:3]}")  # a bug, never an input
        tasks.clear()  # the closures here form cycles: nothing of the pages may wait for the gc
        covered.clear()


class S3Lister(RangeLister):
    """ListObjectsV2 pages by presigned URL over aiohttp, read by `parse_page` (see the module)."""

    @asynccontextmanager
    async def _pages(self, bucket: str, prefix: str):
        import aiohttp

        await self.fs.set_session()
        connector = aiohttp.TCPConnector(limit=self.concurrency, ssl=_ssl(self.fs))
        async with aiohttp.ClientSession(connector=connector, trust_env=True) as http:  # trust_env: HTTPS_PROXY
            # RequestPayer (requester-pays buckets) and credentials ride in the presigned URL's query
            async def fetch(after: str, until: str | None) -> Page:
                params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": self.page_size, "EncodingType": "url",
                          **({"StartAfter": after} if after else {}), **getattr(self.fs, "req_kw", {})}
                for attempt in range(LIST_ATTEMPTS):
                    try:
                        url = await self.fs.s3.generate_presigned_url("list_objects_v2", Params=params)
                        async with http.get(url) as r:
                            body = await r.read()
                            if r.status != 200:
                                raise _error(r.status, body)
                        return parse_page(body)
                    except Exception as e:
                        if attempt == LIST_ATTEMPTS - 1 or not is_transient(e):
                            raise
                        await asyncio.sleep(LIST_BACKOFF_S * 2 ** attempt)
                raise AssertionError("unreachable")

            yield fetch


async def finish_all(tasks: list[asyncio.Task]) -> None:
    """Waits for every task of `tasks`, a list that grows while they run (a range that splits starts
    more); the first error cancels the rest and is raised."""
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_EXCEPTION)
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()
    finally:
        for t in tasks:
            t.cancel()


def _ssl(fs):
    """TLS as the S3 client verifies it: client_kwargs' `verify` (False, or a CA bundle path),
    else AWS_CA_BUNDLE, else aiohttp's default (the system's CAs)."""
    import os
    import ssl

    verify = (getattr(fs, "client_kwargs", None) or {}).get("verify", os.environ.get("AWS_CA_BUNDLE"))
    if verify is False:
        return False
    if isinstance(verify, str) and verify:
        return ssl.create_default_context(cafile=verify)
    return True


def _join(pages: list[list[pa.Array | None]]) -> Columns:
    """The pages' columns joined, one column at a time, each page's part let go once copied: the
    peak is the pages plus one joined column, not twice the listing."""
    out = []
    for c, t in enumerate(_COLUMN_TYPES):
        out.append(pa.concat_arrays([p[c] for p in pages] or [pa.array([], t)]))
        for p in pages:
            p[c] = None
    pa.default_memory_pool().release_unused()  # the pages' small buffers, back to the system
    return tuple(out)  # type: ignore[return-value]


def _error(status: int, body: bytes) -> ListingError:
    code = re.search(rb"<Code>([^<]*)</Code>", body)
    message = re.search(rb"<Message>([^<]*)</Message>", body)
    return ListingError(status, code.group(1).decode() if code else str(status),
                        html.unescape(message.group(1).decode()) if message else body[:200].decode("utf-8", "replace"))


def _columns(keys: pa.Array, etags: pa.Array, sizes: pa.Array, bucket: str, prefix: str,
             skipped: dict[str, int] | None, scheme: str = "s3") -> Columns:
    """Keys below `prefix` -> the image rows' columns (folder placeholders dropped, the others
    counted in `skipped` by extension), vectorised: no Python string per key."""
    folders = pc.ends_with(keys, "/")
    if pc.any(folders).as_py():
        files = pc.invert(folders)
        keys, etags, sizes = keys.filter(files), etags.filter(files), sizes.filter(files)
    image = image_mask(keys, skipped)
    keys = keys.filter(image)
    ids = pc.utf8_slice_codeunits(keys, len(prefix))
    uris = pc.binary_join_element_wise(f"{scheme}://{bucket}/", keys, "")
    return ids, uris, etags.filter(image), sizes.filter(image)


def image_mask(keys: pa.Array, skipped: dict[str, int] | None = None) -> pa.Array:
    """Which keys are images (by extension, any case, as `is_image_path`), vectorised; `skipped`
    counts the others by extension ("" for none)."""
    ext = pc.fill_null(pc.utf8_lower(pc.struct_field(pc.extract_regex(keys, _EXT), "ext")), "")
    image = pc.is_in(ext, pa.array(sorted(IMAGE_EXTENSIONS)))
    if skipped is not None:
        for row in pc.value_counts(ext.filter(pc.invert(image))).to_pylist():
            skipped[row["values"]] = skipped.get(row["values"], 0) + row["counts"]
    return image
