"""Predictor / postprocess: proposals are sorted, consistent with pycocotools, NMS'd and capped.

Uses the narrow backbone with a fixed seed and small scales so the whole file runs in seconds.
Run: pytest tests/test_predictor.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ifcn import Candidates, InferenceConfig, InstanceFCN, Predictor, postprocess

SCALES = (40, 56, 72)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = (rng.random((50, 70, 3)) * 60).astype(np.uint8)
    img[10:30, 5:25] = (200, 30, 30)  # a few flat objects, two of them touching
    img[10:30, 25:45] = (30, 200, 30)
    img[35:48, 50:68] = (30, 30, 200)
    return img


def _config(**kw) -> InferenceConfig:
    return InferenceConfig(**{"scales": SCALES, "windows_per_scale": 40, "max_proposals": 30, "nms_iou": 0.5, **kw})


def _decode(proposals: list[dict]) -> np.ndarray:
    return np.stack([mask_utils.decode(p["rle"]) for p in proposals]).astype(bool)


@pytest.mark.parametrize("nms", ["box", "mask"])
@pytest.mark.parametrize("postprocess_on", ["numpy", "device"])
def test_predict_proposals_are_consistent(model: InstanceFCN, image: np.ndarray, nms: str, postprocess_on: str) -> None:
    config = _config(nms=nms)
    proposals = Predictor(model, config, device="cpu", postprocess_on=postprocess_on).predict(image)
    assert 1 <= len(proposals) <= config.max_proposals
    scores = [p["score"] for p in proposals]
    assert scores == sorted(scores, reverse=True)
    masks = _decode(proposals)
    assert masks.shape[1:] == image.shape[:2]
    for p, mask in zip(proposals, masks):
        assert set(p) == {"score", "rle", "bbox", "area", "scale"}
        assert p["rle"]["size"] == [50, 70] and isinstance(p["rle"]["counts"], str)
        assert p["area"] == int(mask.sum()) > 0
        assert p["area"] == int(mask_utils.area(p["rle"]))
        assert p["bbox"] == mask_utils.toBbox(p["rle"]).tolist()
        assert p["scale"] in config.scales
        assert 0.0 <= p["score"] <= 1.0
    if nms == "box":  # IoU of the tight boxes, as filled rectangles
        masks = np.zeros_like(masks)
        for mk, (x, y, w, h) in zip(masks, (p["bbox"] for p in proposals)):
            mk[int(y):int(y + h), int(x):int(x + w)] = True
    flat = masks.reshape(len(masks), -1).astype(np.int64)
    inter = flat @ flat.T
    union = flat.sum(1)[:, None] + flat.sum(1)[None, :] - inter
    iou = inter / union
    np.fill_diagonal(iou, 0.0)
    assert iou.max() <= config.nms_iou  # no kept pair overlaps above the NMS threshold


def test_max_proposals_caps_output(model: InstanceFCN, image: np.ndarray) -> None:
    many = Predictor(model, _config(max_proposals=1000, nms_iou=1.0), device="cpu").predict(image)
    few = Predictor(model, _config(max_proposals=5, nms_iou=1.0), device="cpu").predict(image)
    assert len(many) > 5 and len(few) == 5
    assert few == many[:5]  # greedy NMS: the cap keeps a prefix


def test_postprocess_of_serialised_candidates_equals_predict(model: InstanceFCN, image: np.ndarray) -> None:
    predictor = Predictor(model, _config(), device="cpu")
    cands = predictor.candidates(image)
    n = len(cands.scores)
    assert n == min(40 * 3, sum(-(-h // 8) * -(-w // 8) for h, w in [(40, 56), (56, 78), (72, 101)]))
    assert cands.masks.shape == (n, 21, 21) and cands.cells.shape == (n, 2) and cands.factor.shape == (n, 2)
    assert set(np.unique(cands.scale)) == set(SCALES)
    round_trip = Candidates.from_dict(cands.to_dict())
    assert postprocess(round_trip, predictor.config) == predictor.predict(image)


def test_empty_results(model: InstanceFCN, image: np.ndarray) -> None:
    # no window passes the score floor
    assert Predictor(model, _config(min_score=1.0), device="cpu").predict(image) == []
    # every pasted mask is empty after binarising
    assert Predictor(model, _config(mask_threshold=0.999999), device="cpu").predict(image) == []
    # no candidates at all (e.g. a serialised empty batch)
    empty = Candidates((50, 70), np.zeros(0, np.float32), np.zeros((0, 2), np.int32), np.zeros((0, 21, 21), np.float16),
                       np.zeros(0, np.int32), np.zeros((0, 2), np.float32))
    assert postprocess(Candidates.from_dict(empty.to_dict()), _config()) == []


def test_tiny_image(model: InstanceFCN) -> None:
    tiny = np.full((3, 5, 3), 128, np.uint8)
    proposals = Predictor(model, _config(scales=(8, 16)), device="cpu").predict(tiny)
    assert proposals  # windows overhang the whole image; the pasted masks are clipped to it
    for p in proposals:
        assert p["rle"]["size"] == [3, 5]
        assert p["area"] == int(mask_utils.decode(p["rle"]).sum()) > 0


def test_rejects_bad_image(model: InstanceFCN) -> None:
    with pytest.raises(ValueError, match="uint8"):
        Predictor(model, _config(), device="cpu").predict(np.zeros((10, 10, 3), np.float32))


def test_windows_are_ranked_across_scales(model: InstanceFCN, image: np.ndarray) -> None:
    """The kept windows are the best windows_per_scale * len(scales) of all scales together: none
    left out scores above one kept (reference: the model's objectness maps, straight from forward)."""
    from ifcn.ops.transforms import image_to_tensor, normalize, resize, scaled_size

    config = _config(windows_per_scale=20)
    groups = Predictor(model, config, device="cpu").windows([image])[0]
    kept = {(int(w.scale[0]), int(y), int(x)) for w, _ in groups for y, x in (w.cells + 21 // 2).tolist()}
    logits = {}
    with torch.inference_mode():
        for short in SCALES:
            size = scaled_size(*image.shape[:2], short, config.max_size)
            _, obj = model(normalize(resize(image_to_tensor(image), size)))  # (1, 1, fh, fw)
            for (y, x), v in np.ndenumerate(obj[0, 0].numpy()):
                logits[(short, y, x)] = float(v)
    assert len(kept) == 20 * len(SCALES) < len(logits)
    assert min(logits[k] for k in kept) >= max(v for k, v in logits.items() if k not in kept) - 1e-5
    scores = np.concatenate([w.scores.numpy() for w, _ in groups])
    np.testing.assert_allclose(np.sort(scores)[::-1][:5], 1 / (1 + np.exp(-np.sort(list(logits.values()))[::-1][:5])),
                               rtol=1e-5)
