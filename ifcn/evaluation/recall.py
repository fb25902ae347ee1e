"""Class-agnostic COCO average recall of mask proposals, as DeepMask and InstanceFCN report it.

pycocotools' COCOeval with `useCats = 0`, iouType 'segm' and `maxDets = [10, 100, 1000]`.
Two IoU protocols:
  "coco"      IoU .50:.05:.95 (10 thresholds), COCO's default;
  "deepmask"  IoU .50:.05:1.0 (11 thresholds), the protocol of DeepMask and of the paper's table.

    from ifcn.evaluation.recall import average_recall
    ar = average_recall("file:///data/instances_val2014.json", results)  # {"AR@10": ..., ...}
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import posixpath
import warnings
from typing import Iterable

import numpy as np
import pyarrow.dataset as ds
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ifcn.data.coco import segmentation_to_rle
from ifcn.io import open_url

MAX_DETS: tuple[int, int, int] = (10, 100, 1000)  # summarize() reads exactly three
IOU_PROTOCOLS: dict[str, np.ndarray] = {
    # np.linspace, not arange: arange's points drift above the true thresholds (pycocotools' own note).
    "coco": np.linspace(0.5, 0.95, 10),
    "deepmask": np.linspace(0.5, 1.0, 11),
}
IOU_LABELS: dict[str, str] = {"coco": "IoU .50:.05:.95 (COCO)", "deepmask": "IoU .50:.05:1.0 (DeepMask/InstanceFCN)"}
METRICS: tuple[str, ...] = ("AR@10", "AR@100", "AR@1000", "AR_small@1000", "AR_medium@1000", "AR_large@1000")
# COCOeval.stats index of each metric for iouType segm/bbox (see COCOeval.summarize._summarizeDets):
# 6..8 are AR at maxDets[0..2]; 9..11 are AR small/medium/large at maxDets[2].
STATS_INDEX: dict[str, int] = dict(zip(METRICS, range(6, 12)))
AGNOSTIC_CATEGORY = 1  # every gt and result is put in this one category: proposals are class-agnostic


def load_gt(gt: dict | str, storage_options: dict | None = None) -> dict:
    """A COCO annotations dict from a dict (copied) or any fsspec URL of a JSON file."""
    if isinstance(gt, dict):
        return copy.deepcopy(gt)
    if not isinstance(gt, str):
        raise TypeError(f"gt: expected a COCO annotations dict or a URL string, got {type(gt).__name__}")
    with open_url(gt, "rb", storage_options) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{gt}: not a JSON file ({e})") from e
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{gt}: not a COCO annotations file (needs 'images' and 'annotations' lists)")
    return data


def _gt_coco(data: dict) -> COCO:
    """COCO object with one agnostic category and filled-in `area`/`iscrowd` (COCOeval reads both)."""
    data = dict(data)
    images = {img["id"]: img for img in data["images"]}
    anns = []
    for i, ann in enumerate(data["annotations"]):
        ann = dict(ann)
        if ann.get("image_id") not in images:
            raise ValueError(f"gt annotation {ann.get('id', i)}: image_id {ann.get('image_id')!r} is not in 'images'")
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        ann["category_id"] = AGNOSTIC_CATEGORY
        if "area" not in ann:
            img = images[ann["image_id"]]
            rle = segmentation_to_rle(ann["segmentation"], img["height"], img["width"])
            ann["area"] = float(mask_utils.area(rle))
        anns.append(ann)
    data["annotations"] = anns
    data["categories"] = [{"id": AGNOSTIC_CATEGORY, "name": "object"}]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results_coco(gt: COCO, results: list[dict]) -> COCO:
    """Like COCO.loadRes for segm results, but accepts an empty list and ignores category ids.

    Results for image ids that are not in gt are dropped with a warning; a result whose RLE size is
    not its image's size is an error (IoU would be meaningless).
    """
    anns = []
    unknown: set = set()
    for i, r in enumerate(results):
        img = gt.imgs.get(r.get("image_id"))
        if img is None:
            unknown.add(r.get("image_id"))
            continue
        segm = r["segmentation"]
        if not isinstance(segm, dict) or "counts" not in segm:
            raise ValueError(f"results[{i}]: segmentation must be a COCO RLE dict {{size, counts}}")
        if [int(v) for v in segm["size"]] != [img["height"], img["width"]]:
            raise ValueError(f"results[{i}]: RLE size {list(segm['size'])} != image {img['id']}'s size "
                             f"[{img['height']}, {img['width']}] in the annotations")
        rle = segmentation_to_rle(segm, img["height"], img["width"])
        anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": AGNOSTIC_CATEGORY,
                     "segmentation": rle, "score": float(r["score"]), "area": float(mask_utils.area(rle)),
                     "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
    if unknown:
        n = sum(1 for r in results if r.get("image_id") in unknown)
        warnings.warn(f"average_recall: dropped {n} results for {len(unknown)} image ids that are not in the "
                      f"annotations (e.g. {sorted(unknown, key=str)[:3]})", stacklevel=3)
    res = COCO()
    res.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                   "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_eval(gt: dict | str, results: list[dict], iou_protocol: str = "coco",
              image_ids: Iterable[int] | None = None, storage_options: dict | None = None) -> COCOeval:
    """The accumulated, summarized COCOeval behind `average_recall` (for callers who want more)."""
    if iou_protocol not in IOU_PROTOCOLS:
        raise ValueError(f"iou_protocol={iou_protocol!r}: choose one of {list(IOU_PROTOCOLS)}")
    gt_coco = _gt_coco(load_gt(gt, storage_options))
    dt_coco = _results_coco(gt_coco, results)
    ev = COCOeval(gt_coco, dt_coco, iouType="segm")
    ev.params.useCats = 0
    ev.params.maxDets = list(MAX_DETS)
    ev.params.iouThrs = IOU_PROTOCOLS[iou_protocol].copy()
    ev.params.imgIds = sorted(gt_coco.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints progress and its own table
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def recall_from_eval(ev: COCOeval) -> dict[str, float]:
    """The six AR numbers read straight from eval['recall'] (T, K, A, M); -1 where no gt falls in range.

    Same rule as summarize(): mean over IoU thresholds of the entries that are not -1.
    """
    p = ev.params
    recall = ev.eval["recall"]  # (T, K=1, A, M)
    out = {}
    for name in METRICS:
        dets = int(name.split("@")[1])
        area = name.split("_")[1].split("@")[0] if "_" in name else "all"
        s = recall[:, :, p.areaRngLbl.index(area), p.maxDets.index(dets)]
        s = s[s > -1]
        out[name] = float(np.mean(s)) if s.size else -1.0
    return out


def average_recall(gt: dict | str, results: list[dict], iou_protocol: str = "coco",
                   image_ids: Iterable[int] | None = None, storage_options: dict | None = None) -> dict[str, float]:
    """Class-agnostic mask AR: {"AR@10", "AR@100", "AR@1000", "AR_small@1000", "AR_medium@1000", "AR_large@1000"}.

    gt: COCO annotations dict or URL; results: COCO results entries {image_id, segmentation (RLE),
    score, category_id (ignored)}. image_ids restricts the evaluated images (default: all in gt);
    images without results count as misses. Crowd gts are ignored as in COCO. A value is -1 when no
    gt falls in that area range (COCO's convention).
    """
    ev = coco_eval(gt, results, iou_protocol, image_ids, storage_options)
    out = recall_from_eval(ev)
    for name, idx in STATS_INDEX.items():  # the two readings must agree; a mismatch is a bug here
        if not np.isclose(out[name], ev.stats[idx]):
            raise AssertionError(f"{name}: eval['recall'] gives {out[name]}, stats[{idx}] gives {ev.stats[idx]}")
    return out


def up_to(ar: dict[str, float], kept: int | None) -> dict[str, float]:
    """AR@k only for the k that results with at most `kept` proposals per image can have.

    AR@1000 of a run capped at 100 is AR@100 again, so it is dropped, and the sized AR@1000 values
    are relabelled @100 (the same numbers): nobody reads "AR@1000" off a run that kept 100.
    """
    if not kept:
        return dict(ar)
    out: dict[str, float] = {}
    for name, v in ar.items():
        prefix, k = name.split("@")
        out.setdefault(name if int(k) <= kept else f"{prefix}@{kept}", v)
    return out


def format_table(ar: dict[str, float], iou_protocol: str = "coco") -> str:
    """A small text table that says which IoU protocol produced the numbers (the metrics `ar` has,
    in its order: see `up_to`)."""
    lines = [f"Class-agnostic mask average recall (%), {IOU_LABELS[iou_protocol]}"]
    for name, v in ar.items():
        lines.append(f"  {name:<15} {'n/a (no gt in range)' if v < 0 else f'{100 * v:6.2f}'}")
    return "\n".join(lines)


def predictions_to_results(image_id: int, proposals: list[dict]) -> list[dict]:
    """ifcn.Predictor.predict() output for one image -> COCO results entries."""
    return [{"image_id": int(image_id), "category_id": AGNOSTIC_CATEGORY, "segmentation": p["rle"],
             "score": float(p["score"])} for p in proposals]


def load_results_json(url: str, storage_options: dict | None = None) -> list[dict]:
    """A COCO results JSON file (a list of {image_id, segmentation, score, ...}) from any fsspec URL."""
    with open_url(url, "rb", storage_options) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url}: not a JSON file ({e})") from e
    if not isinstance(data, list) or (data and not all(isinstance(r, dict) and "segmentation" in r for r in data)):
        raise ValueError(f"{url}: not a COCO segmentation results file (expected a list of "
                         f"{{image_id, segmentation, score}} objects)")
    return data


class FileNameMatcher:
    """Maps pipeline image ids / URIs to COCO image ids by their path's longest suffix equal to a file_name.

    Falls back to the basename when exactly one COCO image has that basename.
    """

    def __init__(self, images: list[dict]) -> None:
        self.by_name = {img["file_name"].lstrip("/"): img["id"] for img in images}
        counts: dict[str, int] = {}
        for name in self.by_name:
            counts[posixpath.basename(name)] = counts.get(posixpath.basename(name), 0) + 1
        self.by_base = {posixpath.basename(n): i for n, i in self.by_name.items() if counts[posixpath.basename(n)] == 1}

    def __call__(self, *keys: str | None) -> int | None:
        for key in keys:
            if not key:
                continue
            path = key.split("://", 1)[-1].split("?", 1)[0].strip("/")
            parts = path.split("/")
            for i in range(len(parts)):
                hit = self.by_name.get("/".join(parts[i:]))
                if hit is not None:
                    return hit
        for key in keys:
            if key:
                hit = self.by_base.get(posixpath.basename(key.split("?", 1)[0]))
                if hit is not None:
                    return hit
        return None


RESULT_COLUMNS = ("image_id", "uri", "score", "rle", "height", "width")  # what results_from_masks reads


def rank_filter(max_proposals: int | None):
    """pyarrow.dataset filter keeping ranks below max_proposals (None: keep all)."""
    return ds.field("rank") < int(max_proposals) if max_proposals is not None else None


def results_from_masks(table, data: dict) -> list[dict]:
    """A masks table (RESULT_COLUMNS) -> COCO results entries, image ids mapped through `data`'s file_names.

    Rows whose `image_id`/`uri` match no COCO `file_name` are dropped with a warning that counts them."""
    cols = {name: table.column(name).to_pylist() for name in RESULT_COLUMNS}
    match = FileNameMatcher(data["images"])
    ids: dict[tuple[str, str], int | None] = {}
    results: list[dict] = []
    missed_rows = 0
    for image_id, uri, score, rle, h, w in zip(cols["image_id"], cols["uri"], cols["score"], cols["rle"],
                                              cols["height"], cols["width"]):
        key = (image_id, uri)
        if key not in ids:
            ids[key] = match(image_id, uri)
        coco_id = ids[key]
        if coco_id is None:
            missed_rows += 1
            continue
        results.append({"image_id": coco_id, "category_id": AGNOSTIC_CATEGORY, "score": float(score),
                        "segmentation": {"size": [int(h), int(w)], "counts": rle}})
    missed = sorted(k[0] for k, v in ids.items() if v is None)
    if missed:
        warnings.warn(f"results_from_masks: {missed_rows} proposal rows of {len(missed)} images match no COCO "
                      f"file_name and were dropped (e.g. {missed[:3]}); of {len(ids)} images, "
                      f"{len(ids) - len(missed)} matched", stacklevel=2)
    return results
