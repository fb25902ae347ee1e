"""jobs.show on a tiny fake pipeline output: Delta tables in the pipeline's exact schema, written
by deltalake's own writer (not the pipeline's), plus a data file no commit added."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from PIL import Image
from pycocotools import mask as mask_utils

from ifcn.tools.viz import draw_proposals
from jobs.show import load_proposals, main
from segment_helpers import nest

H, W = 96, 128
UNCOMMITTED = "00002"  # data files written, never committed: what a crash before the commit leaves


def rect_rle(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> str:
    m = np.zeros((h, w), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    return mask_utils.encode(m)["counts"].decode("ascii")


def fake_output(root, input_url: str | None = None) -> dict[str, np.ndarray]:
    """root/in/{a/one.png, two.png} and root/out/{masks,images}/ Delta tables, like jobs.segment.

    input_url: where the tables say the inputs live (default: file:// URL of root/in).
    """
    rng = np.random.default_rng(0)
    pixels = {"a/one.png": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
              "two.png": np.full((H, W, 3), 90, np.uint8)}
    for name, px in pixels.items():
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(root / "in" / name)
    base = input_url or f"file://{root / 'in'}"
    uri = lambda name: f"{base}/{name}"  # noqa: E731
    # (image_id, rank, score, (y0, y1, x0, x1)); stored out of rank order to check sorting
    props = [("a/one.png", 1, 0.6, (50, 90, 70, 120)), ("a/one.png", 0, 0.9, (10, 40, 10, 60)),
             ("a/one.png", 2, 0.3, (0, 20, 100, 128)), ("two.png", 0, 0.8, (20, 60, 20, 60)),
             ("late.png", 0, 0.7, (5, 25, 5, 25))]
    shards = {"a/one.png": "00000", "two.png": "00001", "bad.jpg": "00001", "late.png": UNCOMMITTED}
    for shard in sorted(set(shards.values())):
        masks = [{"image_id": name, "uri": uri(name), "rank": rank, "score": score,
                  "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (y1 - y0) * (x1 - x0),
                  "rle": rect_rle(y0, y1, x0, x1), "height": H, "width": W, "scale": 600,
                  "shard_id": shard, "run_id": "r1"}
                 for name, rank, score, (y0, y1, x0, x1) in props if shards[name] == shard]
        images = [{"image_id": name, "uri": uri(name), "width": None if bad else W, "height": None if bad else H,
                   "status": "error" if bad else "ok",
                   "error": "image bad.jpg: not an image file; recorded as error row" if bad else None,
                   "num_proposals": sum(p[0] == name for p in props),
                   "read_ms": 1.0, "decode_ms": 1.0, "infer_ms": 1.0, "postprocess_ms": 1.0,
                   "etag": None, "size": None, "shard_id": shard, "run_id": "r1"}
                  for name in sorted(n for n, s in shards.items() if s == shard) for bad in [name == "bad.jpg"]]
        data = nest(images, masks)
        folder = root / "out" / "segments"
        if shard == UNCOMMITTED:  # a data file in the table folder that no commit added (a crash)
            pq.write_table(data, folder / f"part-{shard}-r2-0.parquet", compression="zstd")
        else:
            write_deltalake(str(folder), data, mode="append")
    return pixels


def test_show_draws_the_top_proposals_of_one_image(tmp_path, capsys):
    pixels = fake_output(tmp_path)
    out = tmp_path / "pics" / "one.png"
    argv = ["--output", f"file://{tmp_path / 'out'}", "--image", "a/one.png", "--out", str(out), "--top", "2"]
    assert main(argv) == 0
    assert "drew 2 of 3 proposals of a/one.png" in capsys.readouterr().out
    drawn = np.asarray(Image.open(out).convert("RGB"))
    uri, proposals = load_proposals(str(tmp_path / "out"), "a/one.png")
    assert uri.endswith("in/a/one.png") and [p["rank"] for p in proposals] == [0, 1, 2]
    assert proposals[0]["score"] == pytest.approx(0.9) and proposals[0]["bbox"] == [10, 10, 50, 30]
    assert np.array_equal(drawn, np.asarray(draw_proposals(pixels["a/one.png"], proposals, top=2)))
    changed = np.any(drawn != pixels["a/one.png"], axis=2)
    assert changed[10:40, 10:60].all() and changed[50:90, 70:120].all()  # ranks 0 and 1 drawn
    assert not changed[0:20, 100:128].any()  # rank 2's mask: not drawn with --top 2
    assert not changed[45:, :65].any()  # far from every drawn proposal and label: untouched


def test_show_unknown_and_error_images_are_one_line(tmp_path, capsys):
    fake_output(tmp_path)
    out = str(tmp_path / "x.png")
    assert main(["--output", str(tmp_path / "out"), "--image", "nope.png", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope.png' is not in" in err[0] and "['a/one.png', 'bad.jpg', 'two.png']" in err[0]
    assert main(["--output", str(tmp_path / "out"), "--image", "bad.jpg", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not segmented" in err[0] and "not an image file" in err[0]
    # late.png's data files exist but no commit added them: readers do not see it
    assert main(["--output", str(tmp_path / "out"), "--image", "late.png", "--out", out]) == 2
    assert "'late.png' is not in" in capsys.readouterr().err
    assert main(["--output", str(tmp_path / "missing"), "--image", "two.png", "--out", out]) == 2
    assert "not a jobs.segment output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "out"), "--image", "two.png"])  # no --out
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_show_top_zero_writes_the_plain_image(tmp_path):
    pixels = fake_output(tmp_path)
    out = tmp_path / "two.png"
    assert main(["--output", str(tmp_path / "out"), "--image", "two.png", "--out", f"file://{out}", "--top", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), pixels["two.png"])


@pytest.mark.slow
def test_show_reads_and_writes_s3(tmp_path, s3_bucket, capsys):
    """Tables, image and PNG all on a real S3 endpoint (moto server), through s3fs."""
    import s3fs

    pixels = fake_output(tmp_path, input_url=f"{s3_bucket}/in")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(tmp_path / "in"), f"{s3_bucket}/in", recursive=True)
    fs.put(str(tmp_path / "out"), f"{s3_bucket}/run", recursive=True)
    assert main(["--output", f"{s3_bucket}/run", "--image", "a/one.png", "--out", f"{s3_bucket}/pics/one.png"]) == 0
    with fs.open(f"{s3_bucket}/pics/one.png", "rb") as f:
        drawn = np.asarray(Image.open(f).convert("RGB"))
    _, proposals = load_proposals(f"{s3_bucket}/run", "a/one.png")
    assert len(proposals) == 3
    assert np.array_equal(drawn, np.asarray(draw_proposals(pixels["a/one.png"], proposals, top=20)))
