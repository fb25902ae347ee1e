"""Parallel prefix listing (pipeline/planning/listing.py): key-range splitting, page parsing, and the same
sorted listing as a plain listing on a real S3 endpoint (moto's server)."""
from __future__ import annotations

import posixpath

import pyarrow as pa
import pytest

from pipeline.planning import listing
from pipeline.planning.listing import S3Lister, parse_page, split_points

ODD_KEYS = ["images/a.jpg", "images/sub/b.PNG", "images/sub/deep/c.jpeg", "images/notes.txt", "images/README",
            "images/folder/", "images/empty/", "images/empty/deeper/", "images/x.heic", "images/z.webp",
            "images/with space.jpg", "images/plus+sign.png", "images/100%.jpg", "images/a&b<c>.png",
            "images/quote\"'.gif", "images/ünï/cödé.jpg", "images/日本/写真.JPEG", "images/.hidden.jpg", "images/.jpg",
            "images/~tilde.bmp", "images/a.b/c", "images/dots..jpg", "images/0/1/2/3/4/5.tif",
            "images2/e.jpg", "imagesX.jpg", "other/f.jpg"] + [f"images/many/{i:03d}.jpg" for i in range(40)]


def test_split_points_partition_any_range() -> None:
    """Split points lie strictly inside the range, strictly increasing, for dense and sparse ranges."""
    cases = [("images/0000/00000999.jpg", None, "images/"), ("images/0000/00000999.jpg", "images/0003", "images/"),
             ("", None, ""), ("p/a", "p/a0", "p/"), ("p/ü", None, "p/"), ("p/~~~~~~~~~~", None, "p/"),
             ("p/abc", "p/abd", "p/")]
    for after, until, prefix in cases:
        for n in (2, 7, 64):
            points = split_points(after, until, prefix, n)
            assert len(points) <= n - 1
            bounds = [after, *points]
            assert all(a < b for a, b in zip(bounds, bounds[1:])), (after, until, points)
            if until is not None:
                assert all(p < until for p in points)
            assert all(p.startswith(prefix) for p in points)
    assert len(split_points("images/0000/00000999.jpg", None, "images/", 64)) == 63


def test_parse_page_reads_escaped_and_url_encoded_keys() -> None:
    body = ("<?xml version=\"1.0\"?><ListBucketResult><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount>"
            "<IsTruncated>true</IsTruncated><EncodingType>url</EncodingType>"
            "<Contents><Key>p/a%26b+c%C3%BC.jpg</Key><LastModified>x</LastModified><ETag>&quot;e1&quot;</ETag>"
            "<Size>12</Size></Contents><Contents><Key>p/plain.png</Key><ETag>\"e2\"</ETag><Size>0</Size>"
            "<Owner><ID>o</ID></Owner></Contents></ListBucketResult>").encode()
    page = parse_page(body)
    assert page.keys.to_pylist() == ["p/a&b cü.jpg", "p/plain.png"]
    assert page.etags.to_pylist() == ["e1", "e2"] and page.sizes.to_pylist() == [12, 0] and page.truncated
    plain = body.replace(b"<EncodingType>url</EncodingType>", b"").replace(b"p/a%26b+c%C3%BC.jpg",
                                                                           "p/a&amp;b+cü.jpg".encode())
    assert parse_page(plain).keys.to_pylist() == ["p/a&b+cü.jpg", "p/plain.png"]


def test_columns_pick_images_as_splitext_does() -> None:
    """The vectorised image filter and skipped counts agree with posixpath.splitext key by key."""
    keys = [k for k in ODD_KEYS if k.startswith("images/")]
    skipped: dict[str, int] = {}
    ids, uris, etags, sizes = listing._columns(pa.array(keys), pa.array(["e"] * len(keys)),
                                               pa.array(range(len(keys)), pa.int64()), "bkt", "images/", skipped)
    files = [k for k in keys if not k.endswith("/")]
    images = [k for k in files if posixpath.splitext(k)[1].lower() in listing.IMAGE_EXTENSIONS]
    assert ids.to_pylist() == [k.removeprefix("images/") for k in images]
    assert uris.to_pylist() == [f"s3://bkt/{k}" for k in images]
    expected: dict[str, int] = {}
    for k in files:
        if k not in images:
            ext = posixpath.splitext(k)[1].lower()
            expected[ext] = expected.get(ext, 0) + 1
    assert skipped == expected


@pytest.mark.slow
def test_parallel_s3_listing_equals_a_plain_listing(s3_bucket, monkeypatch) -> None:
    """Nested prefixes, odd key names, empty sub-prefixes and sibling prefixes: the parallel
    listing with tiny pages (many splits) gives exactly the keys, ETags and sizes that s3fs's own
    listing gives, for every concurrency; a transient page failure is retried."""
    import s3fs

    from pipeline.planning.sources import list_inputs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = s3_bucket.removeprefix("s3://")
    fs.pipe({f"{bucket}/{k}": k.encode() for k in ODD_KEYS})
    found = fs.find(f"{bucket}/images", withdirs=False, detail=True)
    reference = sorted((p.removeprefix(f"{bucket}/images/"), f"s3://{p}", info["ETag"].strip('"'), info["size"])
                       for p, info in found.items()
                       if not p.endswith("/") and posixpath.splitext(p)[1].lower() in listing.IMAGE_EXTENSIONS)
    assert len(reference) == 55
    for concurrency, page_size in ((1, 1000), (1, 3), (4, 2), (16, 1), (64, 5)):
        cols = S3Lister(fs, concurrency, page_size).list(f"{bucket}/images")
        assert list(zip(*(c.to_pylist() for c in cols))) == reference, (concurrency, page_size)  # sorted as listed
    fails = {"left": 2}
    real = listing.parse_page

    def flaky(body: bytes):
        if fails["left"]:
            fails["left"] -= 1
            raise ConnectionResetError("reset by peer")
        return real(body)

    monkeypatch.setattr(listing, "parse_page", flaky)
    monkeypatch.setattr(listing, "LIST_BACKOFF_S", 0.0)
    skipped: dict[str, int] = {}
    got = list_inputs(f"{s3_bucket}/images/", skipped=skipped)
    assert fails["left"] == 0
    assert [(it.image_id, it.uri, it.etag, it.size) for it in got] == reference
    assert skipped == {".txt": 1, "": 3, ".heic": 1}  # README, .jpg, a.b/c


@pytest.mark.slow
def test_listing_parts_follow_each_other_and_join_to_the_listing(s3_bucket, monkeypatch) -> None:
    """Parts come out in key order, each right after the one before (after = the previous until),
    hold only keys in (after, until], and joined they are exactly s3fs's own sorted listing, for
    every concurrency, page size and part size; listing after any part's end gives the rest."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = s3_bucket.removeprefix("s3://")
    fs.pipe({f"{bucket}/{k}": k.encode() for k in ODD_KEYS})
    found = fs.find(f"{bucket}/images", withdirs=False, detail=True)
    reference = sorted((p.removeprefix(f"{bucket}/images/"), f"s3://{p}", info["ETag"].strip('"'), info["size"])
                       for p, info in found.items()
                       if not p.endswith("/") and posixpath.splitext(p)[1].lower() in listing.IMAGE_EXTENSIONS)
    for concurrency, page_size, part_rows in ((1, 1000, 1), (1, 3, 7), (4, 2, 1), (16, 1, 5), (64, 5, 20),
                                              (64, 1000, 100_000)):
        parts = list(S3Lister(fs, concurrency, page_size).parts(f"{bucket}/images", part_rows=part_rows))
        rows = [row for p in parts for row in zip(*(c.to_pylist() for c in p.columns))]
        assert rows == reference, (concurrency, page_size, part_rows)
        assert parts[0].after == "" and parts[-1].until is None and all(p.until is not None for p in parts[:-1])
        assert all(a.until == b.after for a, b in zip(parts, parts[1:]))
        assert all(len(p.columns[0]) == part_rows for p in parts[:-1])  # (below FIRST_PART_ROWS: no doubling)
        for p in parts:
            keys = [f"images/{i}" for i in p.columns[0].to_pylist()]
            assert all(p.after < k and (p.until is None or k <= p.until) for k in keys), (p.after, p.until, keys)
        # a run resumed after a part lists exactly the rest: every part with whole pages, else the first,
        # a middle and the last but one (each check is a fresh listing: one page per key at page size 1)
        ends = parts[:-1]
        resumed = ends if page_size >= 1000 else [ends[i] for i in sorted({0, len(ends) // 2, len(ends) - 1}) if ends]
        for p in resumed:
            rest = list(S3Lister(fs, concurrency, page_size).parts(f"{bucket}/images", start_after=p.until))
            assert [row for r in rest for row in zip(*(c.to_pylist() for c in r.columns))] == \
                [row for row in reference if f"images/{row[0]}" > p.until]
    monkeypatch.setattr(listing, "FIRST_PART_ROWS", 2)  # the first parts are small, then double
    parts = list(S3Lister(fs, 8, 3).parts(f"{bucket}/images", part_rows=12))
    assert [len(p.columns[0]) for p in parts] == [2, 4, 8, 12, 12, 12, 5]
    assert [row for p in parts for row in zip(*(c.to_pylist() for c in p.columns))] == reference


@pytest.mark.slow
def test_listing_a_missing_bucket_is_one_line(s3_server) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with pytest.raises(listing.ListingError, match="NoSuchBucket"):
        S3Lister(fs).list("no-such-bucket-h22/images")


def test_listing_tls_follows_the_s3_clients_settings(tmp_path, monkeypatch) -> None:
    """verify=False turns checks off, a CA bundle path (client_kwargs or AWS_CA_BUNDLE) is loaded."""
    import ssl
    import types

    import certifi

    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    fs = lambda **kw: types.SimpleNamespace(client_kwargs=kw)  # noqa: E731
    assert listing._ssl(fs(verify=False)) is False
    assert listing._ssl(fs()) is True
    assert isinstance(listing._ssl(fs(verify=certifi.where())), ssl.SSLContext)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(FileNotFoundError):  # the bundle named is read, not ignored
        listing._ssl(fs())
