"""Azure prefixes listed by sub-prefix in parallel (pipeline/planning/listing_azure.py), through the real
azure-storage-blob SDK, against a loopback server answering the List Blobs REST API over fixed
keys. No Azure emulator installs from PyPI (Azurite is npm) and adlfs does not install beside this
project's pins (its msal caps cryptography < 51), so the filesystem is a stand-in with the parts
of adlfs's AzureBlobFileSystem that the lister uses."""
from __future__ import annotations

import bisect
import posixpath
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import pytest

from pipeline.planning import listers
from pipeline.planning import listing
from pipeline.planning.listing_azure import AzureLister

from test_listing import ODD_KEYS

FOLDER_MARKERS = {"images/marker", "images/dense/sub"}  # blobs whose metadata says hdi_isfolder (adlfs: folders)
KEYS = sorted(ODD_KEYS + [f"images/dense/{i:04d}.png" for i in range(120)] + ["images/ünï/a.jpg", "images/zz.jpg"]
              + sorted(FOLDER_MARKERS))


class ListBlobsServer:
    """List Blobs (prefix, delimiter, marker, maxresults) of container 'c' over KEYS; 404
    ContainerNotFound for any other; `fail` first answers 503 that many times; `requests` logs
    each request's query."""

    def __init__(self) -> None:
        server = self
        self.fail, self.requests = 0, []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                server.requests.append(q)
                code, body = 200, b""
                if server.fail:
                    server.fail -= 1
                    code = 503
                elif url.path != "/acct/c" or q.get("comp") != "list":
                    code = 404
                    body = b"<?xml version=\"1.0\"?><Error><Code>ContainerNotFound</Code><Message>no</Message></Error>"
                else:
                    body = server.page(q)
                self.send_response(code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                if code == 404:
                    self.send_header("x-ms-error-code", "ContainerNotFound")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/acct"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def page(self, q: dict[str, str]) -> bytes:
        prefix, delimiter, n = q.get("prefix", ""), q.get("delimiter", ""), int(q.get("maxresults", 5000))
        i = int(q["marker"]) if q.get("marker") else bisect.bisect_left(KEYS, prefix)
        entries: list[str] = []
        while i < len(KEYS) and KEYS[i].startswith(prefix) and len(entries) < n:
            cut = KEYS[i].find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = KEYS[i][:cut + 1]
                entries.append(f"<BlobPrefix><Name>{escape(common)}</Name></BlobPrefix>")
                while i < len(KEYS) and KEYS[i].startswith(common):
                    i += 1
                continue
            metadata = "<hdi_isfolder>true</hdi_isfolder>" if KEYS[i] in FOLDER_MARKERS else ""
            entries.append(f"<Blob><Name>{escape(KEYS[i])}</Name><Properties><Last-Modified>Thu, 01 Jan 2026 "
                           f"00:00:00 GMT</Last-Modified><Etag>0x8D{i:012X}</Etag><Content-Length>{i * 7}"
                           f"</Content-Length><BlobType>BlockBlob</BlobType></Properties>"
                           f"{f'<Metadata>{metadata}</Metadata>' if 'metadata' in q.get('include', '') else ''}</Blob>")
            i += 1
        more = i < len(KEYS) and KEYS[i].startswith(prefix)
        return (f"<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults ServiceEndpoint=\"{self.url}/\" "
                f"ContainerName=\"c\"><Prefix>{escape(prefix)}</Prefix><MaxResults>{n}</MaxResults><Blobs>"
                f"{''.join(entries)}</Blobs><NextMarker>{i if more else ''}</NextMarker></EnumerationResults>").encode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class AdlfsStandIn:
    """What AzureLister uses of adlfs's AzureBlobFileSystem: protocol, loop, service_client (an aio
    BlobServiceClient), split_path, unstrip_protocol."""

    protocol = ("abfs", "az", "abfss")

    def __init__(self, account_url: str) -> None:
        from azure.storage.blob.aio import BlobServiceClient
        from fsspec.asyn import get_loop

        self.loop = get_loop()
        # no retries of the SDK's own: the lister's retries are what the tests look at
        self.service_client = BlobServiceClient(account_url, retry_total=0)

    def split_path(self, path: str) -> tuple[str, str, None]:
        container, _, key = path.partition("/")
        return container, key, None

    def unstrip_protocol(self, name: str) -> str:
        return f"abfs://{name}"


@pytest.fixture(scope="module")
def azure() -> Iterator[tuple[ListBlobsServer, AdlfsStandIn]]:
    pytest.importorskip("azure.storage.blob")
    server = ListBlobsServer()
    fs = AdlfsStandIn(server.url)
    try:
        yield server, fs
    finally:
        from fsspec.asyn import sync

        sync(fs.loop, fs.service_client.close)
        server.stop()


def _skipped(prefix: str) -> dict[str, int]:
    """The keys below `prefix` that are neither images nor folders, by extension."""
    counts: dict[str, int] = {}
    for k in KEYS:
        ext = posixpath.splitext(k)[1].lower()
        file = k.startswith(prefix) and not k.endswith("/") and k not in FOLDER_MARKERS
        if file and ext not in listing.IMAGE_EXTENSIONS:
            counts[ext] = counts.get(ext, 0) + 1
    return counts


def _reference(prefix: str) -> list[tuple[str, str, str, int]]:
    return [(k.removeprefix(prefix), f"abfs://c/{k}", f"0x8D{i:012X}", i * 7) for i, k in enumerate(KEYS)
            if k.startswith(prefix) and not k.endswith("/")
            and posixpath.splitext(k)[1].lower() in listing.IMAGE_EXTENSIONS]


@pytest.mark.parametrize("path", ["c/images", "c/images/dense", "c/images/sub", "c"])
def test_azure_listing_by_sub_prefix_equals_the_keys(azure, path) -> None:
    """Nested, unicode and empty sub-prefixes, the container root, blobs beside sub-prefixes: every
    concurrency and page size gives exactly the keys' rows, sorted, through listers.list_prefix's
    dispatch; sub-prefixes are listed on their own (no flat listing of the whole prefix), found
    level after level while there are fewer than `concurrency`."""
    server, fs = azure
    prefix = f"{path.partition('/')[2]}/" if "/" in path else ""
    reference = _reference(prefix)
    assert reference
    for concurrency, page_size in ((1, 5000), (1, 3), (4, 2), (64, 1)):
        server.requests.clear()
        skipped: dict[str, int] = {}
        lister = AzureLister(fs, concurrency, page_size)
        cols = lister.list(path, skipped) if page_size != 5000 else listers.list_prefix(fs, path, skipped)  # dispatch
        assert list(zip(*(c.to_pylist() for c in cols))) == reference, (path, concurrency, page_size)
        assert skipped == _skipped(prefix)  # folder markers are no files
        flat = [q for q in server.requests if not q.get("delimiter")]
        assert all(q.get("prefix", "") != prefix for q in flat)  # the prefix itself only with delimiter "/"
        if path == "c/images" and concurrency == 64:  # 9 sub-prefixes < 64: walks descend 4 levels, then flat
            walked = {q.get("prefix") for q in server.requests if q.get("delimiter")}
            assert {"images/0/", "images/0/1/", "images/0/1/2/", "images/sub/deep/"} <= walked, walked
            assert "images/0/1/2/3/" not in walked and "images/0/1/2/3/" in {q.get("prefix") for q in flat}


def test_azure_page_failures_are_retried_and_missing_containers_named(azure, monkeypatch) -> None:
    server, fs = azure
    monkeypatch.setattr(listing, "LIST_BACKOFF_S", 0.0)
    server.fail = 3
    cols = AzureLister(fs, 4, 2).list("c/images/sub")
    assert server.fail == 0 and list(zip(*(c.to_pylist() for c in cols))) == _reference("images/sub/")
    with pytest.raises(FileNotFoundError, match="abfs://nope: no such container"):
        AzureLister(fs).list("nope/images")
