"""Azure listing on loopback: `AzureLister` (through the azure-storage-blob SDK) against a synthetic
List Blobs endpoint (prefix, delimiter, marker, maxresults) over bench/synthkeys.py's `SyntheticKeys`
(`images/NNNN/NNNNNNNN.jpg`: one sub-prefix per 1000 keys), each page after a set delay.

    PYTHONPATH=. python bench/synthlist_azure.py --keys 200000 --concurrency 1,64
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.synthkeys import QuietHandler, SyntheticKeys, serve  # noqa: E402


class ListBlobsServer:
    """List Blobs of any container over `keys`, each page after `delay_s`; `pages` counts them."""

    def __init__(self, keys: SyntheticKeys, delay_s: float) -> None:
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                q = self.query()
                time.sleep(delay_s)
                self.send(200, server.page(q))

        self.keys, self.pages = keys, 0
        self.httpd = serve(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/acct"

    def page(self, q: dict[str, str]) -> bytes:
        self.pages += 1
        keys, prefix, delimiter = self.keys, q.get("prefix", ""), q.get("delimiter", "")
        i = int(q["marker"]) if q.get("marker") else keys.index_from(prefix)
        entries: list[str] = []
        while i < len(keys) and keys[i].startswith(prefix) and len(entries) < int(q.get("maxresults", 5000)):
            cut = keys[i].find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = keys[i][:cut + 1]
                entries.append(f"<BlobPrefix><Name>{common}</Name></BlobPrefix>")
                i = keys.index_from(common + "\U0010ffff")
                continue
            entries.append(f"<Blob><Name>{keys[i]}</Name><Properties><Last-Modified>Thu, 01 Jan 2026 00:00:00 GMT"
                           f"</Last-Modified><Etag>0x8D{i:012X}</Etag><Content-Length>{i}</Content-Length>"
                           f"<BlobType>BlockBlob</BlobType></Properties><Metadata /></Blob>")
            i += 1
        more = i < len(keys) and keys[i].startswith(prefix)
        return (f"<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults ContainerName=\"c\"><Blobs>"
                f"{''.join(entries)}</Blobs><NextMarker>{i if more else ''}</NextMarker></EnumerationResults>").encode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Filesystem:
    """The parts of adlfs's AzureBlobFileSystem that AzureLister uses (adlfs does not install beside
    this project's pins: its msal caps cryptography < 51)."""

    protocol = ("abfs", "az", "abfss")

    def __init__(self, account_url: str) -> None:
        from azure.storage.blob.aio import BlobServiceClient
        from fsspec.asyn import get_loop

        self.loop, self.service_client = get_loop(), BlobServiceClient(account_url)

    def split_path(self, path: str) -> tuple[str, str, None]:
        container, _, key = path.partition("/")
        return container, key, None

    def unstrip_protocol(self, name: str) -> str:
        return f"abfs://{name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=200_000)
    p.add_argument("--page-delay-ms", type=float, default=200.0)
    p.add_argument("--concurrency", default="64", help="comma-separated: one listing each")
    args = p.parse_args()
    import psutil
    from fsspec.asyn import sync

    from pipeline.planning.listing_azure import AzureLister

    keys = SyntheticKeys(args.keys)
    server = ListBlobsServer(keys, args.page_delay_ms / 1000)
    fs = Filesystem(server.url)
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            server.pages, cpu0, t0 = 0, sum(psutil.Process().cpu_times()[:2]), time.perf_counter()
            ids = AzureLister(fs, concurrency).list("c/images")[0]
            wall = time.perf_counter() - t0
            expected = [keys[0].removeprefix("images/"), keys[len(keys) - 1].removeprefix("images/")]
            if len(ids) != len(keys) or [ids[0].as_py(), ids[-1].as_py()] != expected:
                raise SystemExit(f"listed {len(ids)} keys of {len(keys)}, or out of order")
            print(f"Azure list {len(keys):,} synthetic keys, {args.page_delay_ms:.0f} ms per page, concurrency "
                  f"{concurrency}: {wall:.1f} s -> {len(keys) / wall:,.0f} keys/s; {server.pages} requests; "
                  f"CPU {sum(psutil.Process().cpu_times()[:2]) - cpu0:.1f} s (lister and endpoint); "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        sync(fs.loop, fs.service_client.close)
        server.stop()


if __name__ == "__main__":
    main()
