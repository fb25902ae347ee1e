"""Listing, manifests, sharding, the read stage, configs and the schema helpers (no Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ifcn import InferenceConfig
from pipeline.config import SegmentConfig, SegmentError
from ifcn.image import MAX_PIXELS, MIN_SIDE
from pipeline.tables.schema import MASKS_SCHEMA, REDUCED_SCHEMA, SEGMENTS_SCHEMA, masks_view, reduced_to_segments
from pipeline.planning.sources import InputItem, Listing, list_inputs, listing_digest, make_shards
from pipeline.stages.read import image_from_row, read_images
from segment_helpers import write_images


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    write_images(root, ["b.jpg", "A.PNG", "sub/c.Jpeg", "sub/x/d.bmp", "e.tif", "f.TIFF", "g.webp"])
    (root / "sub" / "notes.txt").write_text("skip me")
    (root / "h.gif").write_bytes(b"GIF89a")  # listed (decoding it fails later: an error row, not a skip)
    (root / "i.svg").write_text("<svg/>")  # not an image format the job decodes: not listed
    return root


def test_prefix_listing_recursive_case_insensitive_sorted(tree: Path) -> None:
    items = list_inputs(str(tree))
    ids = [it.image_id for it in items]
    assert ids == sorted(["A.PNG", "b.jpg", "e.tif", "f.TIFF", "g.webp", "h.gif", "sub/c.Jpeg", "sub/x/d.bmp"])
    assert all(it.uri == (tree / it.image_id).as_uri() for it in items)
    # file:// URL and trailing slash list the same inputs (same digest -> same shards on re-run)
    assert listing_digest(list_inputs(tree.as_uri() + "/")) == listing_digest(items)


def test_prefix_listing_is_the_same_when_gathered_in_small_chunks(tree: Path, monkeypatch, capsys) -> None:
    """8 images gathered 3 at a time (chunks of 3, 3, 2) list exactly as in one chunk, each key once
    (Listing.build would hide a key gathered twice, but say so on stderr)."""
    import pipeline.planning.listing as listing

    whole = [(it.image_id, it.uri) for it in list_inputs(str(tree))]
    monkeypatch.setattr(listing, "LIST_CHUNK", 3)
    skipped: dict[str, int] = {}
    assert [(it.image_id, it.uri) for it in list_inputs(str(tree), skipped=skipped)] == whole
    assert len(whole) == 8 and skipped == {".txt": 1, ".svg": 1}
    assert "duplicate" not in capsys.readouterr().err


def test_single_image_input(tree: Path) -> None:
    st = (tree / "b.jpg").stat()
    assert list(list_inputs(str(tree / "b.jpg"))) == [InputItem("b.jpg", (tree / "b.jpg").as_uri(),
                                                                f"mtime:{int(st.st_mtime * 1e9)}", st.st_size)]


def test_manifests_txt_and_parquet(tree: Path, tmp_path: Path) -> None:
    uris = [(tree / "b.jpg").as_uri(), str(tree / "A.PNG"), "s3://bucket/k/z.jpg"]
    txt = tmp_path / "m.txt"
    txt.write_text("# comment\n\n" + "\n".join(uris + [uris[0]]) + "\n")  # a duplicate line is listed once
    pqt = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": uris}), pqt)
    expect = sorted([(tree / "b.jpg").as_uri(), (tree / "A.PNG").as_uri(), "s3://bucket/k/z.jpg"])
    for manifest in (txt, pqt):
        items = list_inputs(str(manifest))
        assert [it.image_id for it in items] == expect and [it.uri for it in items] == expect
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"path": uris}), bad)
    with pytest.raises(SegmentError, match="no 'uri' column"):
        list_inputs(str(bad))


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such file or prefix"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
    (lambda p: (p / "data.csv").write_text("a,b") and p / "data.csv", "neither a manifest"),
])
def test_bad_inputs_are_one_line_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(SegmentError, match=message) as e:
        list_inputs(str(make(tmp_path)))
    assert "\n" not in str(e.value) and "--input" in str(e.value)


@pytest.mark.parametrize("chunk", [3, 65_536])
def test_columnar_listing_digests_equal_the_json_formula(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed digests must equal sha256 of the whole listing's JSON (what _job.json and
    commit markers of earlier outputs hold), across chunk boundaries and for non-ASCII keys."""
    import hashlib
    import json

    import pipeline.planning.sources as sources

    monkeypatch.setattr(sources, "DIGEST_CHUNK", chunk)
    # plain ASCII (joined in Arrow) and names json.dumps escapes (quote, backslash, non-ASCII, control)
    odd = ['-é', '"q', "b\\s", "\t", "\x7f"]
    pairs = [(f"d/{i:03d}{odd[i - 5] if i >= 5 else ''}.jpg", f"s3://b/d/{i:03d}{odd[i - 5] if i >= 5 else ''}.jpg")
             for i in range(10)]
    shuffled = pairs[5:] + pairs[:5] + pairs[2:4]  # unsorted, two repeated
    listing = Listing.build([p[0] for p in shuffled], [p[1] for p in shuffled])
    assert [(it.image_id, it.uri) for it in listing] == pairs  # sorted, each once
    whole = hashlib.sha256(json.dumps([list(p) for p in pairs], separators=(",", ":")).encode()).hexdigest()
    assert listing.digest() == whole == listing_digest([InputItem(*p) for p in pairs])
    spans = listing.spans(4)
    assert [(s.shard_id, s.start, s.stop) for s in spans] == [("000000", 0, 4), ("000001", 4, 8), ("000002", 8, 10)]
    shards = make_shards([InputItem(*p) for p in pairs], 4)
    assert [listing.digest(s.start, s.stop) for s in spans] == [s.digest for s in shards]
    assert [listing.shard(s) for s in spans] == shards


def test_shards_are_fixed_and_stable() -> None:
    items = [InputItem(f"{i:03d}.jpg", f"file:///x/{i:03d}.jpg") for i in range(10)]
    shards = make_shards(items, 4)
    assert [s.shard_id for s in shards] == ["000000", "000001", "000002"]
    assert [len(s.items) for s in shards] == [4, 4, 2]
    assert [it for s in shards for it in s.items] == items  # nothing lost or repeated
    again = make_shards(list(items), 4)
    assert [s.digest for s in again] == [s.digest for s in shards]
    assert len({s.digest for s in shards}) == 3
    assert make_shards(items, 4)[0].digest != make_shards(items[1:], 4)[0].digest
    assert make_shards([], 4) == []
    assert [s.shard_id for s in make_shards(items * 200, 1)][-1] == "001999"  # ids sort like shards


def test_read_stage_rows_and_errors(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    uris = [(tree / "b.jpg").as_uri(), (tmp_path / "corrupt.png").as_uri(), (tmp_path / "gone.jpg").as_uri()]
    batch = pa.table({"image_id": ["b", "c", "g"], "uri": uris, "shard_id": ["0", "0", "1"]})
    out = read_images(batch, None, MAX_PIXELS, MIN_SIDE)
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error"]
    assert [r["shard_id"] for r in rows] == ["0", "0", "1"]
    assert "corrupt.png" in rows[1]["error"] and "gone.jpg" in rows[2]["error"]
    assert rows[1]["pixels"] == b"" and rows[1]["width"] is None and rows[0]["error"] is None
    image = image_from_row(rows[0]["pixels"], rows[0]["height"], rows[0]["width"])
    from PIL import Image
    np.testing.assert_array_equal(image, np.asarray(Image.open(tree / "b.jpg").convert("RGB")))
    too_big = read_images(batch.slice(0, 1), None, max_pixels=100, min_side=MIN_SIDE).to_pylist()[0]
    assert too_big["status"] == "error" and "max_pixels=100" in too_big["error"]


def test_config_routes_options_and_keeps_library_defaults() -> None:
    c = SegmentConfig.from_options("in/", "out/", "m.pt", scales=(64, 96), nms_iou=0.7, shard_size=8, amp="bf16")
    assert c.inference == InferenceConfig(scales=(64, 96), nms_iou=0.7)
    assert (c.shard_size, c.amp, c.max_pixels, c.min_side) == (8, "bf16", MAX_PIXELS, MIN_SIDE)
    assert SegmentConfig.from_options("in/", "out/", "m.pt").inference == InferenceConfig()
    with pytest.raises(SegmentError, match="nms_iou"):
        SegmentConfig.from_options("in/", "out/", "m.pt", nms_iou=2.0)
    with pytest.raises(SegmentError, match="--shard-size 0"):
        SegmentConfig.from_options("in/", "out/", "m.pt", shard_size=0)
    with pytest.raises(SegmentError, match="--amp"):
        SegmentConfig.from_options("in/", "out/", "m.pt", amp="fp8")
    with pytest.raises(SegmentError, match="is the input prefix"):
        SegmentConfig.from_options("data/", "data", "m.pt")
    assert json.dumps(c.to_dict())  # the manifest stores it


def _reduced(rows: list[dict]) -> pa.Table:
    base = {"uri": "file:///x", "status": "ok", "error": None, "read_ms": 1.0, "decode_ms": 1.0, "infer_ms": 1.0,
            "postprocess_ms": 1.0, "shard_id": "000000", "width": 30, "height": 20}
    full = [{**base, **r, "num_proposals": len(r["proposals"])} for r in rows]
    return pa.Table.from_pylist(full, schema=REDUCED_SCHEMA)


def _prop(rank: int, score: float) -> dict:
    return {"rank": rank, "score": score, "bbox": [1.0, 2.0, 3.0, 4.0], "area": 12, "rle": f"r{rank}", "scale": 64}


def test_reduced_rows_become_sorted_segments_and_the_masks_view() -> None:
    reduced = _reduced([
        {"image_id": "b", "proposals": [_prop(0, 0.9), _prop(1, 0.5)]},
        {"image_id": "a", "proposals": [_prop(0, 0.7)]},
        {"image_id": "c", "status": "error", "error": "bad", "width": None, "height": None, "proposals": []},
    ])
    segments = reduced_to_segments(reduced, "r1", {"a": ("e1", 10)})
    masks = masks_view(segments)
    assert segments.schema == SEGMENTS_SCHEMA and masks.schema == MASKS_SCHEMA
    assert segments.column("image_id").to_pylist() == ["a", "b", "c"]
    assert segments.column("etag").to_pylist() == ["e1", None, None] and set(segments.column("run_id").to_pylist()) \
        == {"r1"}
    assert [(r["image_id"], r["rank"], r["rle"]) for r in masks.to_pylist()] == [("a", 0, "r0"), ("b", 0, "r0"),
                                                                                   ("b", 1, "r1")]
    assert masks.column("bbox").to_pylist()[0] == [1.0, 2.0, 3.0, 4.0]
    assert masks.column("height").to_pylist() == [20, 20, 20]
    empty = masks_view(reduced_to_segments(_reduced([{"image_id": "c", "status": "error", "proposals": []}])))
    assert empty.num_rows == 0 and empty.schema == MASKS_SCHEMA
    assert masks_view(segments, ["rle", "image_id"]).to_pydict() == {"rle": ["r0", "r0", "r1"],
                                                                     "image_id": ["a", "b", "b"]}


def test_publish_refuses_a_shard_with_missing_images(tmp_path: Path) -> None:
    from pipeline.stages.sink import Fragment, StageWriter, publish_shard

    listing = Listing.build(["a", "b"], ["file:///a", "file:///b"], etags=["e1", "e2"], sizes=[10, 20])
    shard = listing.shard(listing.spans(2)[0])
    out = str(tmp_path / "out")
    meta = StageWriter(out, None, "r1")(_reduced([{"image_id": "a", "proposals": []}])).to_pylist()[0]
    with pytest.raises(RuntimeError, match="not publishing"):
        publish_shard(out, None, shard, [Fragment(meta["path"], ("a",))], "r1")
    assert not (tmp_path / "out" / "segments").exists()
    meta = StageWriter(out, None, "r1")(_reduced([{"image_id": "a", "proposals": [_prop(0, 0.5)]},
                                                  {"image_id": "b", "proposals": []}])).to_pylist()[0]
    result = publish_shard(out, None, shard, [Fragment(meta["path"], ("a", "b"))], "r1")
    assert (result["num_images"], result["num_ok"], result["num_proposals"]) == (2, 2, 1)
    images = pq.read_table(tmp_path / "out" / "segments" / result["file"]["path"])
    assert result["file"]["path"].startswith("part-000000-r1-") and result["image_ids"] == ["a", "b"]
    assert images.column("etag").to_pylist() == ["e1", "e2"] and images.column("size").to_pylist() == [10, 20]
    assert set(images.column("run_id").to_pylist()) == {"r1"}
    assert [len(p) for p in images.column("proposals").to_pylist()] == [1, 0]
    stats = json.loads(result["file"]["stats"])
    assert stats["numRecords"] == 2 and (stats["minValues"]["image_id"], stats["maxValues"]["image_id"]) == ("a", "b")
    assert result["file"]["size"] == (tmp_path / "out" / "segments" / result["file"]["path"]).stat().st_size


def test_local_listing_records_each_objects_version(tree: Path) -> None:
    listing = list_inputs(str(tree))
    for item in listing:
        st = (tree / item.image_id).stat()
        assert (item.etag, item.size) == (f"mtime:{int(st.st_mtime * 1e9)}", st.st_size)
