"""A synthetic bucket for listing benches: `SyntheticKeys` (N generated keys, any one by index,
without holding them) and `ListingServer` (a loopback S3 ListObjectsV2 endpoint over them, each page
after a set delay), so listing 10M keys at realistic latency is measurable without putting 10M
objects into moto. Used by bench/scale.py (synthlist, synthstart), bench/synthlist_gcs.py and
bench/synthlist_azure.py.
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class QuietHandler(BaseHTTPRequestHandler):
    """A keep-alive handler (as object stores are) that logs nothing; `send` answers, `query` reads
    the request's query string. Subclasses set `content_type` and the do_* methods."""

    protocol_version = "HTTP/1.1"
    content_type = "application/xml"

    def log_message(self, *args) -> None:
        pass

    def send(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}


class _Server(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a lister opening 64 connections at once had the rest of
    # its SYNs dropped and retried by TCP 1, 3, 7 s later (small listings took 8-150 s)
    request_queue_size = 1024


def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """`handler` on a loopback port, one thread per connection, served from a daemon thread; a client
    that ends mid-answer is no error (a bench may kill its client)."""
    httpd = _Server(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, address: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd

class SyntheticKeys:
    """N keys `images/{i // 1000:04d}/{i:08d}.jpg` (sorted as S3 sorts them), built on demand: a
    sequence `bisect` can search, so a page is found without holding N strings."""

    def __init__(self, n: int, prefix: str = "images/") -> None:
        self.n, self.prefix = n, prefix

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        return f"{self.prefix}{i // 1000:04d}/{i:08d}.jpg"

    def index_after(self, key: str) -> int:
        """The first i with self[i] > key."""
        import bisect

        return bisect.bisect_right(self, key)

    def index_from(self, key: str) -> int:
        import bisect

        return bisect.bisect_left(self, key)


class ListingServer:
    """A loopback S3 endpoint that answers ListObjectsV2 (prefix, delimiter, start-after,
    continuation-token, max-keys) over `SyntheticKeys` in bucket `bucket`, each page after
    `delay_s` (what S3 takes for a page: ~50-200 ms), one thread per connection. HEAD of the bucket
    answers 200 and of any key 404 (so s3fs sees `bucket/images` as a prefix). `pages` counts the
    LIST requests answered, `served` the keys they carried."""

    def __init__(self, keys: SyntheticKeys, delay_s: float, bucket: str = "bucket") -> None:
        server = self

        class Handler(QuietHandler):
            def do_HEAD(self) -> None:
                path = self.path.split("?")[0].strip("/")
                self.send(200 if path == bucket else 404)

            def do_GET(self) -> None:
                q = self.query()
                if urlsplit(self.path).path.strip("/") != bucket or q.get("list-type") != "2":
                    return self.send(404, b"<Error><Code>NoSuchKey</Code></Error>")
                time.sleep(delay_s)
                self.send(200, server.page(q))

        self.keys, self.pages, self.served = keys, 0, 0
        self.httpd = serve(Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def page(self, q: dict[str, str]) -> bytes:
        from xml.sax.saxutils import escape

        self.pages += 1
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        max_keys = min(1000, int(q.get("max-keys", 1000)))
        keys = self.keys
        start = max(keys.index_from(prefix), keys.index_after(q.get("start-after", "")))
        if q.get("continuation-token"):
            start = max(start, int(q["continuation-token"]))
        contents, prefixes, i = [], [], start
        while i < len(keys) and len(contents) + len(prefixes) < max_keys:
            key = keys[i]
            if not key.startswith(prefix):
                i = len(keys)
                break
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:  # a common prefix: skip every key below it
                common = key[:cut + len(delimiter)]
                prefixes.append(common)
                i = keys.index_from(common + "\U0010ffff")
                continue
            contents.append(key)
            i += 1
        self.served += len(contents)
        truncated = i < len(keys) and keys[i].startswith(prefix)
        body = ["<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
                "<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
                f"<Name>bucket</Name><Prefix>{escape(prefix)}</Prefix><MaxKeys>{max_keys}</MaxKeys>",
                f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>",
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if truncated:
            body.append(f"<NextContinuationToken>{i}</NextContinuationToken>")
        body += [f"<Contents><Key>{escape(k)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                 f"<ETag>&quot;{hash(k) & 0xffffffffffffffff:032x}&quot;</ETag><Size>{len(k) * 1000}</Size>"
                 f"<StorageClass>STANDARD</StorageClass></Contents>" for k in contents]
        body += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes]
        body.append("</ListBucketResult>")
        return "".join(body).encode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
