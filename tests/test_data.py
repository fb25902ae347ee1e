"""COCO reader (polygons, RLE, crowd, errors) and the synthetic dataset writer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ifcn.data import CocoDataset, SynthConfig, render_image, write_synthetic_dataset

H, W = 30, 40


def write_coco(root: Path, anns: list[dict], images: list[dict] | None = None, image_size=(H, W)) -> tuple[str, str]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*image_size, 3), 7, np.uint8)).save(root / "images" / "a.png")
    coco = {"images": images or [{"id": 5, "file_name": "a.png", "height": H, "width": W}],
            "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return str(root / "images"), str(root / "ann.json")


def hand_annotations() -> list[dict]:
    rect = np.zeros((H, W), np.uint8)
    rect[5:15, 20:30] = 1
    rle = mask_utils.encode(np.asfortranarray(rect))
    crowd = np.zeros((H, W), np.uint8)
    crowd[20:28, 2:12] = 1
    col = crowd.T.reshape(-1)  # uncompressed RLE counts (column-major), as COCO stores crowd regions
    change = np.flatnonzero(np.diff(col)) + 1
    counts = np.diff(np.concatenate(([0], change, [col.size]))).tolist()
    return [
        {"id": 1, "image_id": 5, "category_id": 1, "iscrowd": 0, "bbox": [2, 3, 8, 6],
         "segmentation": [[2, 3, 10, 3, 10, 9, 2, 9]]},  # polygon
        {"id": 2, "image_id": 5, "category_id": 1, "iscrowd": 0, "bbox": [20, 5, 10, 10],
         "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},  # compressed RLE
        {"id": 3, "image_id": 5, "category_id": 1, "iscrowd": 1, "bbox": [2, 20, 10, 8],
         "segmentation": {"size": [H, W], "counts": counts}},  # uncompressed RLE
    ]


def test_reader_decodes_polygons_and_rle_like_pycocotools(tmp_path):
    images, ann = write_coco(tmp_path, hand_annotations())
    ds = CocoDataset(images, "file://" + ann)
    assert len(ds) == 1
    s = ds[0]
    assert s.image.shape == (H, W, 3) and s.image.dtype == np.uint8 and s.image_id == 5
    coco = COCO(ann)
    for j, a in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=[5]))):
        np.testing.assert_array_equal(s.masks[j], coco.annToMask(a))
    assert s.masks[1, 5:15, 20:30].all() and s.masks[1].sum() == 100
    assert s.masks[2, 20:28, 2:12].all() and s.masks[2].sum() == 80
    assert s.iscrowd.tolist() == [False, False, True]
    np.testing.assert_array_equal(s.boxes[1], [20, 5, 10, 10])


def test_image_without_annotations_has_empty_arrays(tmp_path):
    images, ann = write_coco(tmp_path, [])
    s = CocoDataset(images, ann)[0]
    assert s.masks.shape == (0, H, W) and s.boxes.shape == (0, 4) and s.iscrowd.shape == (0,)


def test_reader_decodes_like_the_pipeline_16_bit_and_corrupt(tmp_path):
    """Training sees the job's pixels: a 16-bit PNG is scaled, not saturated to white by convert("RGB")."""
    images, ann = write_coco(tmp_path, [])
    ramp = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 65535 // (H * W - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "images" / "a.png")  # mode I;16
    got = CocoDataset(images, ann).read_image(0)
    want = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)  # round(v * 255 / 65535)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    (tmp_path / "images" / "a.png").write_bytes(b"<html>403</html>")
    with pytest.raises(ValueError, match=r"a\.png: not a decodable image"):
        CocoDataset(images, ann).read_image(0)


def test_missing_annotations_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json.*--annotations"):
        CocoDataset(str(tmp_path), str(tmp_path / "nope.json"))


def test_wrong_image_root_names_path_and_suggests_images_flag(tmp_path):
    _, ann = write_coco(tmp_path, hand_annotations())
    ds = CocoDataset(str(tmp_path / "elsewhere"), ann)
    with pytest.raises(FileNotFoundError, match=r"a\.png.*elsewhere/a\.png.*--images"):
        ds[0]


def test_size_mismatch_is_an_error(tmp_path):
    images, ann = write_coco(tmp_path, hand_annotations(), image_size=(H + 2, W))
    with pytest.raises(ValueError, match="40x32.*40x30.*do not match"):
        CocoDataset(images, ann)[0]


def test_rle_of_another_size_is_an_error(tmp_path):
    anns = hand_annotations()
    anns[1]["segmentation"]["size"] = [H, W + 1]
    images, ann = write_coco(tmp_path, anns)
    with pytest.raises(ValueError, match="annotation id 2.*does not match"):
        CocoDataset(images, ann)[0]


def test_unknown_image_id_is_an_error(tmp_path):
    anns = hand_annotations()
    anns[0]["image_id"] = 99
    images, ann = write_coco(tmp_path, anns)
    with pytest.raises(ValueError, match="annotation id 1.*image_id 99"):
        CocoDataset(images, ann)


def test_synthetic_dataset_is_byte_identical_for_a_seed(tmp_path):
    cfg = SynthConfig(size=96)
    write_synthetic_dataset(str(tmp_path / "a"), 3, seed=4, config=cfg)
    write_synthetic_dataset("file://" + str(tmp_path / "b"), 3, seed=4, config=cfg)
    write_synthetic_dataset(str(tmp_path / "c"), 3, seed=5, config=cfg)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["annotations.json", "images/000000.png", "images/000001.png",
                                       "images/000002.png"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "annotations.json").read_bytes() != (tmp_path / "c" / "annotations.json").read_bytes()


def test_synthetic_dataset_reads_back_with_exact_masks(tmp_path):
    coco = write_synthetic_dataset(str(tmp_path), 4, seed=0)
    ds = CocoDataset(str(tmp_path / "images"), str(tmp_path / "annotations.json"))
    assert len(ds) == 4 and coco["categories"] == [{"id": 1, "name": "blob", "supercategory": "shape"}]
    for i in range(4):
        s = ds[i]
        _, masks = render_image(np.random.default_rng([0, i]))
        np.testing.assert_array_equal(s.masks.astype(bool), np.stack(masks))
        assert s.image.shape == (256, 256, 3)


def test_synthetic_instances_touch_and_have_model_friendly_sizes():
    touching, sides = 0, []
    for i in range(20):
        _, masks = render_image(np.random.default_rng([7, i]))
        m = np.stack(masks).astype(bool)
        assert m.sum(0).max() <= 1  # visible masks never overlap
        assert len(masks) >= 2
        for a in range(len(m)):
            ys, xs = np.nonzero(m[a])
            sides.append(max(np.ptp(ys), np.ptp(xs)) + 1)
            grown = m[a].copy()
            grown[1:] |= m[a][:-1]
            grown[:-1] |= m[a][1:]
            grown[:, 1:] |= m[a][:, :-1]
            grown[:, :-1] |= m[a][:, 1:]
            touching += sum(bool((grown & m[b]).any()) for b in range(a + 1, len(m)))
    assert touching >= 20  # on average at least one touching pair per image
    assert 30 <= min(sides) and max(sides) <= 140 and 60 <= np.median(sides) <= 110


def test_synthetic_dataset_on_s3(s3_bucket):
    url = s3_bucket + "/synth"
    write_synthetic_dataset(url, 2, seed=1, config=SynthConfig(size=64, min_object=0.3, max_object=0.6, min_area=50))
    ds = CocoDataset(url + "/images", url + "/annotations.json")
    s = ds[1]
    assert s.image.shape == (64, 64, 3) and len(s.masks) >= 1


def test_synth_cli_rejects_bad_flags(capsys):
    from jobs.synth import main

    with pytest.raises(SystemExit) as e:
        main(["--output", "/tmp/x", "--num-images", "0", "--seed", "1"])
    assert e.value.code == 2
    assert "--num-images" in capsys.readouterr().err
