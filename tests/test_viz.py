"""draw_proposals colours exactly the mask (plus box lines and label), nothing else."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ifcn.tools.viz import MASK_ALPHA, PALETTE, draw_proposals

H, W = 120, 160


def proposal(y0: int, y1: int, x0: int, x1: int, score: float, str_counts: bool = True) -> dict:
    m = np.zeros((H, W), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(m)
    if str_counts:
        rle["counts"] = rle["counts"].decode("ascii")
    return {"rle": rle, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score, "area": int(m.sum())}


def test_mask_pixels_change_and_outside_does_not():
    image = np.full((H, W, 3), 100, np.uint8)
    image[:, :, 1] = 150
    out = np.asarray(draw_proposals(image, [proposal(40, 80, 50, 110, 0.93)], top=5))
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.any(out != image, axis=2)
    inside = np.zeros((H, W), bool)
    inside[40:80, 50:110] = True
    label = np.zeros((H, W), bool)
    label[40 - 20:40, 50:50 + 80] = True  # the score label sits just above the box
    assert changed[inside].all()  # every mask pixel changed colour
    assert not changed[~(inside | label)].any()  # nothing outside the mask and label changed
    assert changed[label].any()  # and the label was drawn
    # Interior (away from outline/box lines): the translucent blend of the first palette colour.
    expect = np.rint((1 - MASK_ALPHA) * image[60, 80].astype(float) + MASK_ALPHA * np.array(PALETTE[0]))
    assert np.array_equal(out[60, 80], expect.astype(np.uint8))
    assert np.array_equal(out[40, 80], PALETTE[0])  # outline / box edge in the solid colour


def test_top_limits_drawing_and_bytes_counts_work():
    image = np.zeros((H, W, 3), np.uint8)
    props = [proposal(60, 100, 20, 60, 0.9, str_counts=False), proposal(60, 100, 100, 140, 0.5)]
    out = np.asarray(draw_proposals(image, props, top=1))
    assert np.any(out[80, 40] != 0)  # best proposal drawn
    assert np.all(out[70:100, 100:140] == 0)  # second one not drawn
    both = np.asarray(draw_proposals(image, props, top=None))
    assert np.array_equal(both[80, 120], np.rint(MASK_ALPHA * np.array(PALETTE[1])).astype(np.uint8))


def test_empty_proposals_and_bad_inputs():
    image = np.full((H, W, 3), 7, np.uint8)
    assert np.array_equal(np.asarray(draw_proposals(image, [])), image)
    with pytest.raises(ValueError, match="uint8"):
        draw_proposals(image.astype(np.float32), [])
    small = proposal(0, 10, 0, 10, 0.5)
    small["rle"] = mask_utils.encode(np.ones((10, 10), np.uint8, order="F"))
    with pytest.raises(ValueError, match="mask size"):
        draw_proposals(image, [small])
