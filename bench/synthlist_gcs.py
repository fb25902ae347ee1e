"""GCS listing on loopback: `GCSLister` against a synthetic objects.list endpoint (JSON API: prefix,
startOffset, endOffset, pageToken, maxResults) over bench/synthkeys.py's `SyntheticKeys`, each page after
a set delay, as `scale.py synthlist` does for S3.

    PYTHONPATH=. python bench/synthlist_gcs.py --keys 500000 --concurrency 1,64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.synthkeys import QuietHandler, SyntheticKeys, serve  # noqa: E402


class GCSListingServer:
    """objects.list of bucket `bucket` over `keys`, each page after `delay_s`; `pages` counts them."""

    def __init__(self, keys: SyntheticKeys, delay_s: float, bucket: str = "bucket") -> None:
        server = self

        class Handler(QuietHandler):
            content_type = "application/json"

            def do_GET(self) -> None:
                if urlsplit(self.path).path != f"/storage/v1/b/{bucket}/o":
                    return self.send(404, b'{"error": {"code": 404, "message": "Not Found"}}')
                time.sleep(delay_s)
                self.send(200, server.page(self.query()))

        self.keys, self.pages = keys, 0
        self.httpd = serve(Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def page(self, q: dict[str, str]) -> bytes:
        self.pages += 1
        keys, prefix = self.keys, q.get("prefix", "")
        i = max(keys.index_from(prefix), keys.index_from(q.get("startOffset", "")), int(q.get("pageToken", 0)))
        end = keys.index_from(q["endOffset"]) if "endOffset" in q else len(keys)
        items = []
        while i < end and len(items) < min(1000, int(q.get("maxResults", 1000))) and keys[i].startswith(prefix):
            items.append({"name": keys[i], "etag": f"CJ{i}EAE=", "size": str(i)})
            i += 1
        out: dict = {"kind": "storage#objects", "items": items}
        if i < end and keys[i].startswith(prefix):
            out["nextPageToken"] = str(i)
        return json.dumps(out).encode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=500_000)
    p.add_argument("--page-delay-ms", type=float, default=200.0)
    p.add_argument("--concurrency", default="64", help="comma-separated: one listing each")
    args = p.parse_args()
    import gcsfs.core
    import psutil

    from pipeline.planning.listing_gcs import GCSLister

    keys = SyntheticKeys(args.keys)
    server = GCSListingServer(keys, args.page_delay_ms / 1000)
    os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    try:
        fs = gcsfs.core.GCSFileSystem(token="anon", skip_instance_cache=True)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            server.pages, cpu0, t0 = 0, sum(psutil.Process().cpu_times()[:2]), time.perf_counter()
            ids = GCSLister(fs, concurrency).list("bucket/images")[0]
            wall = time.perf_counter() - t0
            expected = [keys[0].removeprefix("images/"), keys[len(keys) - 1].removeprefix("images/")]
            if len(ids) != len(keys) or [ids[0].as_py(), ids[-1].as_py()] != expected:
                raise SystemExit(f"listed {len(ids)} keys of {len(keys)}, or out of order")
            print(f"GCS list {len(keys):,} synthetic keys, {args.page_delay_ms:.0f} ms per page of 1000, "
                  f"concurrency {concurrency}: {wall:.1f} s -> {len(keys) / wall:,.0f} keys/s; {server.pages} pages; "
                  f"CPU {sum(psutil.Process().cpu_times()[:2]) - cpu0:.1f} s (lister and endpoint); "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
