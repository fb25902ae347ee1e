"""Average recall against hand-computed values and a direct COCOeval run; Parquet loader round trip."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ifcn.evaluation.recall import (IOU_PROTOCOLS, RESULT_COLUMNS, STATS_INDEX, average_recall, coco_eval, format_table,
                           load_results_json, predictions_to_results, rank_filter, recall_from_eval, results_from_masks)
from pipeline import read_output
from pipeline.tables.schema import MASKS_SCHEMA
from segment_helpers import nest

H = W = 200


def rle(*rects: tuple[int, int, int, int]) -> dict:
    """Compressed RLE (str counts) of the union of rectangles (y0, y1, x0, x1), end-exclusive."""
    m = np.zeros((H, W), dtype=np.uint8, order="F")
    for y0, y1, x0, x1 in rects:
        m[y0:y1, x0:x1] = 1
    r = mask_utils.encode(m)
    r["counts"] = r["counts"].decode("ascii")
    return r


def hand_set() -> tuple[dict, list[dict]]:
    """3 counted gts with predictions of known IoU:

    A (image 1, 10x10 = 100 px, small): exact prediction, IoU 1.0.
    B (image 1, 40x40 = 1600 px, medium): prediction = B + 240 px strip, IoU 1600/1840 = 0.8696.
    C (image 2, 100x100 = 10000 px, large): prediction 90x65 inside C, IoU 0.585, ranked 11th in its
      image behind 10 non-overlapping decoys (so AR@10 misses it).
    Plus a crowd gt with a matching decoy (ignored), and image 3 with no gt but a prediction.
    """
    images = [{"id": i, "file_name": f"sub/{i:06d}.jpg", "height": H, "width": W} for i in (1, 2, 3)]
    a, b, c = rle((0, 10, 0, 10)), rle((100, 140, 100, 140)), rle((0, 100, 100, 200))
    crowd = rle((150, 200, 0, 100))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": a, "area": 100, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "segmentation": b, "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "segmentation": c, "area": 10000, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 3, "segmentation": crowd, "area": 5000, "iscrowd": 1},
    ]
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}]}
    res = [
        {"image_id": 1, "category_id": 3, "segmentation": a, "score": 0.9},
        {"image_id": 1, "category_id": 3, "segmentation": rle((100, 140, 100, 140), (90, 100, 100, 124)), "score": 0.8},
        {"image_id": 1, "category_id": 3, "segmentation": rle((160, 170, 10, 20)), "score": 0.95},  # in the crowd
        {"image_id": 2, "category_id": 3, "segmentation": rle((0, 90, 100, 165)), "score": 0.5},
        {"image_id": 3, "category_id": 3, "segmentation": rle((0, 50, 0, 50)), "score": 0.5},
    ]
    res += [{"image_id": 2, "category_id": 3, "segmentation": rle((150, 160, 10 * i, 10 * i + 9)),
             "score": 0.6 + 0.01 * i} for i in range(10)]
    return gt, res


# Per gt, the number of thresholds its prediction passes: A all, B those <= 0.8696, C those <= 0.585.
EXPECTED = {
    "coco": {"AR@10": 18 / 30, "AR@100": 20 / 30, "AR@1000": 20 / 30,
             "AR_small@1000": 1.0, "AR_medium@1000": 0.8, "AR_large@1000": 0.2},
    "deepmask": {"AR@10": 19 / 33, "AR@100": 21 / 33, "AR@1000": 21 / 33,
                 "AR_small@1000": 1.0, "AR_medium@1000": 8 / 11, "AR_large@1000": 2 / 11},
}


def test_hand_set_ious_are_what_the_expectations_assume():
    gt, res = hand_set()
    a, b, c = (ann["segmentation"] for ann in gt["annotations"][:3])
    assert mask_utils.iou([res[1]["segmentation"]], [b], [0])[0, 0] == pytest.approx(1600 / 1840)
    assert mask_utils.iou([res[3]["segmentation"]], [c], [0])[0, 0] == pytest.approx(0.585)


@pytest.mark.parametrize("protocol", ["coco", "deepmask"])
def test_average_recall_matches_hand_computed(protocol):
    gt, res = hand_set()
    ar = average_recall(gt, res, iou_protocol=protocol)
    assert ar == pytest.approx(EXPECTED[protocol])


def direct_cocoeval(gt: dict, res: list[dict], iou_thrs: np.ndarray) -> np.ndarray:
    """The plain pycocotools recipe, no helpers of ours."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(res))
        ev = COCOeval(coco, dt, "segm")
        ev.params.useCats = 0
        ev.params.maxDets = [10, 100, 1000]
        ev.params.iouThrs = iou_thrs
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("protocol", ["coco", "deepmask"])
@pytest.mark.parametrize("seed", [0, 1])
def test_average_recall_equals_direct_cocoeval(protocol, seed):
    rng = np.random.default_rng(seed)
    gt, _ = hand_set()
    res = []  # jittered copies of the gt rectangles (IoUs spread over the thresholds) and random boxes
    rects = {1: [(0, 10, 0, 10), (100, 140, 100, 140)], 2: [(0, 100, 100, 200)]}
    for image_id, rs in rects.items():
        for y0, y1, x0, x1 in rs:
            for _ in range(6):
                j = rng.integers(-(y1 - y0) // 3, (y1 - y0) // 3 + 1, size=4)
                box = (max(0, y0 + j[0]), min(H, y1 + j[1]), max(0, x0 + j[2]), min(W, x1 + j[3]))
                res.append({"image_id": image_id, "category_id": 7, "segmentation": rle(box),
                            "score": float(rng.random())})
    for _ in range(40):
        y0, x0 = rng.integers(0, 150, size=2)
        h, w = rng.integers(5, 120, size=2)
        res.append({"image_id": int(rng.integers(1, 4)), "category_id": 3,
                    "segmentation": rle((y0, min(H, y0 + h), x0, min(W, x0 + w))), "score": float(rng.random())})
    gt_copy = copy.deepcopy(gt)
    ar = average_recall(gt, res, iou_protocol=protocol)
    assert gt == gt_copy  # the caller's dict is not modified
    stats = direct_cocoeval(gt, res, IOU_PROTOCOLS[protocol])
    assert ar == pytest.approx({name: stats[i] for name, i in STATS_INDEX.items()})
    assert 0.2 < ar["AR@1000"] < 1.0  # the set must exercise matching at some thresholds, not all


def test_recall_array_and_stats_agree_and_maxdets_are_three():
    gt, res = hand_set()
    ev = coco_eval(gt, res)
    assert ev.params.maxDets == [10, 100, 1000]
    assert ev.eval["recall"].shape == (10, 1, 4, 3)  # (T, K, A, M)
    assert recall_from_eval(ev) == pytest.approx({n: ev.stats[i] for n, i in STATS_INDEX.items()})


def test_empty_results_give_zero_recall():
    gt, _ = hand_set()
    ar = average_recall(gt, [])
    assert ar == {"AR@10": 0.0, "AR@100": 0.0, "AR@1000": 0.0,
                  "AR_small@1000": 0.0, "AR_medium@1000": 0.0, "AR_large@1000": 0.0}


def test_area_range_without_gt_is_minus_one_and_table_says_protocol():
    gt, res = hand_set()
    gt["annotations"] = [a for a in gt["annotations"] if a["id"] != 3]  # no large gt left
    ar = average_recall(gt, res, iou_protocol="deepmask")
    assert ar["AR_large@1000"] == -1.0
    table = format_table(ar, "deepmask")
    assert "1.0" in table.splitlines()[0] and "n/a" in table


def test_crowd_gt_and_images_without_gt_do_not_count():
    gt, res = hand_set()
    base = average_recall(gt, res)
    no_crowd = copy.deepcopy(gt)
    no_crowd["annotations"] = [a for a in no_crowd["annotations"] if not a["iscrowd"]]
    assert average_recall(no_crowd, res) == pytest.approx(base)
    assert average_recall(gt, [r for r in res if r["image_id"] != 3]) == pytest.approx(base)


def test_image_ids_restrict_evaluation_and_unknown_images_warn():
    gt, res = hand_set()
    ar = average_recall(gt, res, image_ids=[2])  # only gt C, found at 2 of 10 thresholds within top 100
    assert ar["AR@100"] == pytest.approx(0.2) and ar["AR@10"] == 0.0
    with pytest.warns(UserWarning, match="1 results for 1 image ids"):
        average_recall(gt, res + [{"image_id": 99, "segmentation": res[0]["segmentation"], "score": 1.0}])


def test_gt_without_area_and_with_polygons():
    gt, res = hand_set()
    for ann in gt["annotations"]:
        del ann["area"]
    gt["annotations"][0]["segmentation"] = [[0, 0, 10, 0, 10, 10, 0, 10]]  # polygon of A's square
    ar = average_recall(gt, res)
    assert ar["AR_medium@1000"] == pytest.approx(0.8) and ar["AR_large@1000"] == pytest.approx(0.2)


def test_wrong_rle_size_names_the_result():
    gt, res = hand_set()
    bad = mask_utils.encode(np.zeros((10, 10), np.uint8, order="F"))
    with pytest.raises(ValueError, match=r"results\[0\]: RLE size"):
        average_recall(gt, [{"image_id": 1, "segmentation": bad, "score": 1.0}])
    with pytest.raises(ValueError, match="iou_protocol"):
        average_recall(gt, res, iou_protocol="voc")


def test_predictions_to_results_and_json_loader(tmp_path):
    gt, res = hand_set()
    proposals = [{"score": 0.7, "rle": res[0]["segmentation"], "bbox": [0, 0, 10, 10], "area": 100, "scale": 600}]
    out = predictions_to_results(1, proposals)
    assert out == [{"image_id": 1, "category_id": 1, "segmentation": res[0]["segmentation"], "score": 0.7}]
    path = tmp_path / "res.json"
    path.write_text(json.dumps(res))
    assert average_recall(gt, load_results_json(f"file://{path}")) == pytest.approx(EXPECTED["coco"])
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="not a COCO segmentation results file"):
        load_results_json(str(path))


def write_masks(root, res_by_name: dict[str, list[dict]], uncommitted: tuple[str, ...] = ()) -> None:
    """`<root>/segments/`: jobs.segment's Delta table (written by deltalake's own writer), one file
    per name; the names in `uncommitted` get a data file in the table folder that no commit added."""
    from deltalake import write_deltalake

    for n, (name, rs) in enumerate(res_by_name.items()):
        rs = sorted(rs, key=lambda r: -r["score"])
        rows = {
            "image_id": [name] * len(rs), "uri": [f"s3://bucket/in/{name}"] * len(rs),
            "rank": list(range(len(rs))), "score": [r["score"] for r in rs],
            "bbox": [[float(v) for v in mask_utils.toBbox(r["segmentation"])] for r in rs],
            "area": [int(mask_utils.area(r["segmentation"])) for r in rs],
            "rle": [r["segmentation"]["counts"] for r in rs],
            "height": [H] * len(rs), "width": [W] * len(rs), "scale": [600] * len(rs),
            "shard_id": [f"{n:06d}"] * len(rs), "run_id": ["r1"] * len(rs),
        }
        flat = pa.table(rows, schema=MASKS_SCHEMA).to_pylist()
        image = {"image_id": name, "uri": f"s3://bucket/in/{name}", "width": W, "height": H, "status": "ok",
                 "num_proposals": len(rs), "shard_id": f"{n:06d}", "run_id": "r1"}
        table = nest([image], flat)
        part = root / "segments"
        part.mkdir(parents=True, exist_ok=True)
        if name in uncommitted:
            pq.write_table(table, part / f"part-{n}.parquet", compression="zstd")
        else:  # jobs.segment's layout: a commit to the Delta table adds the file
            write_deltalake(str(part), table, mode="append")


def test_parquet_loader_round_trip(tmp_path):
    gt, res = hand_set()
    by_name = {}
    for r in res:
        # image 1 is listed by its full relative path, image 2 and 3 by basename only
        name = "sub/000001.jpg" if r["image_id"] == 1 else f"{r['image_id']:06d}.jpg"
        by_name.setdefault(name, []).append(r)
    by_name["stray.jpg"] = res[:2]  # matches no file_name
    write_masks(tmp_path, by_name)
    read = lambda n=None: read_output(f"file://{tmp_path}", "masks", list(RESULT_COLUMNS), rank_filter(n))  # noqa: E731
    with pytest.warns(UserWarning, match=r"2 proposal rows of 1 images match no COCO file_name"):
        loaded = results_from_masks(read(), gt)
    assert len(loaded) == len(res)
    key = lambda r: (r["image_id"], r["segmentation"]["counts"])  # noqa: E731
    assert sorted(map(key, loaded)) == sorted(map(key, res))
    assert average_recall(gt, loaded) == pytest.approx(EXPECTED["coco"])
    with pytest.warns(UserWarning, match=r"1 proposal rows of 1 images"):
        top1 = results_from_masks(read(1), gt)
    assert sorted(r["image_id"] for r in top1) == [1, 2, 3]  # rank 0 of each image only


def test_parquet_loader_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jobs.segment output"):
        read_output(str(tmp_path / "nope"), "masks", list(RESULT_COLUMNS))


# ---- jobs.evaluate ---------------------------------------------------------------------------------------------

def write_gt(tmp_path, gt: dict) -> str:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    return str(path)


def test_job_scores_results_json_and_writes_beside_it(tmp_path, capsys):
    from jobs.evaluate import main

    gt, res = hand_set()
    ann = write_gt(tmp_path, gt)
    (tmp_path / "res.json").write_text(json.dumps(res))
    assert main(["--annotations", ann, "--predictions", str(tmp_path / "res.json"), "--iou-protocol", "deepmask"]) == 0
    printed = capsys.readouterr().out
    assert "IoU .50:.05:1.0" in printed and f"{100 * 21 / 33:6.2f}" in printed
    report = json.loads((tmp_path / "res.ar.json").read_text())
    assert report["metrics"] == pytest.approx(EXPECTED["deepmask"])
    assert report["iou_protocol"] == "deepmask" and len(report["iou_thresholds"]) == 11
    assert report["num_images"] == 3 and report["num_results"] == len(res)


def test_job_scores_pipeline_folder_with_max_proposals(tmp_path, capsys):
    from jobs.evaluate import main

    gt, res = hand_set()
    ann = write_gt(tmp_path, gt)
    by_name: dict[str, list[dict]] = {}
    for r in res:
        by_name.setdefault(f"{r['image_id']:06d}.jpg", []).append(r)
    # a shard whose data file landed but was never committed (a crash): perfect masks of every object,
    # which would lift every AR to 1.0 if a reader took uncommitted files
    perfect = [{"image_id": a["image_id"], "segmentation": a["segmentation"], "score": 1.0} for a in gt["annotations"]]
    by_name["sub/000002.jpg"] = perfect  # matches image 2 by its full file_name
    write_masks(tmp_path / "out", by_name, uncommitted=("sub/000002.jpg",))
    out = tmp_path / "nums" / "ar.json"
    assert main(["--annotations", ann, "--predictions", f"file://{tmp_path / 'out'}", "--max-proposals", "10",
                 "--out", str(out)]) == 0
    # Only the 10 best per image: C's prediction (11th in image 2) is gone; AR@100/1000 of results capped
    # at 10 would be AR@10 again, so only @10 is reported (sized ones relabelled @10).
    report = json.loads(out.read_text())
    assert report["kept_proposals"] == 10
    assert list(report["metrics"]) == ["AR@10", "AR_small@10", "AR_medium@10", "AR_large@10"]
    assert report["metrics"]["AR@10"] == pytest.approx(0.6)
    assert "AR@100 " not in capsys.readouterr().out  # the printed table follows the metrics
    assert main(["--annotations", ann, "--predictions", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "ar.json").read_text())["metrics"] == pytest.approx(EXPECTED["coco"])


@pytest.mark.parametrize("argv, message", [
    (["--predictions", "x.json"], "required: --annotations"),
    (["--annotations", "a.json"], "exactly one of --checkpoint"),
    (["--annotations", "a.json", "--checkpoint", "c.pt"], "--checkpoint needs --images"),
    (["--annotations", "a.json", "--predictions", "p.json", "--scales", "1,2"], "--scales only applies"),
    (["--annotations", "a.json", "--predictions", "p.json", "--iou-protocol", "voc"], "invalid choice"),
    (["--annotations", "a.json", "--checkpoint", "c.pt", "--images", "i", "--scales", "x"], "comma-separated"),
])
def test_job_bad_flags_are_one_line(argv, message, capsys):
    from jobs.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_job_missing_files_are_one_line(tmp_path, capsys):
    from jobs.evaluate import main

    gt, res = hand_set()
    ann = write_gt(tmp_path, gt)
    assert main(["--annotations", str(tmp_path / "nope.json"), "--predictions", ann]) == 2
    assert main(["--annotations", ann, "--predictions", str(tmp_path / "nope.json")]) == 2
    (tmp_path / "emptydir").mkdir()
    assert main(["--annotations", ann, "--predictions", str(tmp_path / "emptydir")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("jobs.evaluate: error: ") for line in err)
    assert "nope.json: no such file" in err[0] and "without segments/" in err[2]


@pytest.mark.slow
def test_job_runs_a_checkpoint_over_images(tmp_path, capsys):
    """A random narrow model over tiny images whose gt is its own top-3 proposals: AR@10 must be exactly 1.

    That holds only if the job reads the right file for each image id, at the right size and orientation.
    """
    import torch
    from PIL import Image

    from ifcn import InferenceConfig, InstanceFCN, ModelConfig, Predictor, save_checkpoint
    from jobs.evaluate import main

    torch.manual_seed(0)
    model = InstanceFCN(ModelConfig(backbone="vgg16_narrow"))
    save_checkpoint(model, str(tmp_path / "model.pt"))
    predictor = Predictor(model, InferenceConfig(scales=(64, 96), max_proposals=50), device="cpu")
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    results = []
    for image_id, (h, w) in zip((5, 9, 11), ((72, 100), (90, 64), (64, 64))):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"{image_id}.png")
        gt["images"].append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        proposals = predictor.predict(pixels)
        assert proposals, "the random model should still propose something"
        gt["annotations"] += [{"id": len(gt["annotations"]) + k + 1, "image_id": image_id, "category_id": 1,
                               "segmentation": p["rle"], "iscrowd": 0} for k, p in enumerate(proposals[:3])]
        results += predictions_to_results(image_id, proposals)
    ann = write_gt(tmp_path, gt)
    assert main(["--annotations", ann, "--checkpoint", str(tmp_path / "model.pt"), "--images",
                 f"file://{tmp_path / 'img'}", "--scales", "64,96", "--max-proposals", "50", "--limit", "2",
                 "--save-predictions", str(tmp_path / "preds.json"), "--device", "cpu"]) == 0
    assert "2/2 images" in capsys.readouterr().err
    report = json.loads((tmp_path / "preds.ar.json").read_text())
    assert report["num_images"] == 2 and report["metrics"]["AR@10"] == 1.0
    first_two = [r for r in results if r["image_id"] in (5, 9)]
    assert len(json.loads((tmp_path / "preds.json").read_text())) == len(first_two)
    full = average_recall(gt, first_two, image_ids=[5, 9])
    assert report["kept_proposals"] == 50  # capped at 50: AR@100 and AR@1000 would be AR@50 again
    assert report["metrics"] == pytest.approx({"AR@10": full["AR@10"], "AR@50": full["AR@100"],
                                               "AR_small@50": full["AR_small@1000"],
                                               "AR_medium@50": full["AR_medium@1000"],
                                               "AR_large@50": full["AR_large@1000"]})


@pytest.mark.slow
def test_job_reads_and_writes_s3(tmp_path, s3_bucket, capsys):
    """Annotations, a pipeline output and the report on a real S3 endpoint (moto server)."""
    import s3fs

    from jobs.evaluate import main

    gt, res = hand_set()
    write_gt(tmp_path, gt)
    by_name: dict[str, list[dict]] = {}
    for r in res:
        by_name.setdefault(f"{r['image_id']:06d}.jpg", []).append(r)
    write_masks(tmp_path / "out", by_name)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(tmp_path / "instances.json"), f"{s3_bucket}/instances.json")
    fs.put(str(tmp_path / "out"), f"{s3_bucket}/run", recursive=True)
    assert main(["--annotations", f"{s3_bucket}/instances.json", "--predictions", f"{s3_bucket}/run"]) == 0
    assert f"written to {s3_bucket}/run/ar.json" in capsys.readouterr().out
    report = json.loads(fs.cat(f"{s3_bucket}/run/ar.json"))
    assert report["metrics"] == pytest.approx(EXPECTED["coco"])


def test_up_to_keeps_the_k_a_capped_run_can_have() -> None:
    from ifcn.evaluation.recall import up_to

    ar = {"AR@10": 0.5, "AR@100": 0.7, "AR@1000": 0.7, "AR_small@1000": 0.2, "AR_medium@1000": 0.8,
          "AR_large@1000": -1.0}
    assert up_to(ar, 100) == {"AR@10": 0.5, "AR@100": 0.7, "AR_small@100": 0.2, "AR_medium@100": 0.8,
                              "AR_large@100": -1.0}
    assert up_to(ar, 10) == {"AR@10": 0.5, "AR_small@10": 0.2, "AR_medium@10": 0.8, "AR_large@10": -1.0}
    assert up_to(ar, 1000) == ar and up_to(ar, None) == ar
    assert "AR_small@10" in format_table(up_to(ar, 10)) and "AR@100" not in format_table(up_to(ar, 10))
