"""ifcn.ops.rle.compress equals pycocotools' compressed RLE strings byte for byte (random and edge-case masks).
Run: pytest tests/test_rle.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ifcn.ops.rle import compress, compress_one


def _coco(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """(uncompressed runs, pycocotools' string) of a (H, W) 0/1 mask, runs read off independently."""
    flat = np.asfortranarray(mask.astype(np.uint8)).reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a new run starts
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).astype(np.uint32)
    if flat[0]:  # COCO runs start with background: a zero-length first run
        runs = np.concatenate(([0], runs)).astype(np.uint32)
    string = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
    return runs, string


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [np.zeros((5, 7), np.uint8), np.ones((5, 7), np.uint8), np.ones((1, 1), np.uint8),
           np.zeros((1, 1), np.uint8), np.eye(6, dtype=np.uint8)]
    checker = np.indices((9, 11)).sum(0) % 2
    out += [checker, 1 - checker]
    big = np.zeros((480, 640), np.uint8)
    big[10:470, 5:600] = 1  # long runs: several 5-bit groups, large negative differences
    out += [big, 1 - big]
    for p in (0.02, 0.5, 0.98):
        out.append((rng.random((37, 53)) < p).astype(np.uint8))
    for _ in range(20):  # blobs of random sizes
        h, w = rng.integers(1, 300, 2)
        m = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:rng.integers(y0, h + 1), x0:rng.integers(x0, w + 1)] = 1
        out.append(m)
    return out


@pytest.mark.parametrize("i", range(len(_masks())))
def test_compress_one_equals_pycocotools(i: int) -> None:
    runs, want = _coco(_masks()[i])
    assert compress_one(runs) == want
    # and pycocotools decodes it to the same runs (the reference runs above are right)
    size = list(_masks()[i].shape)
    assert mask_utils.frPyObjects({"counts": runs.tolist(), "size": size}, *size)["counts"].decode() == want


def test_compress_many_at_once() -> None:
    pairs = [_coco(m) for m in _masks()]
    runs = [r for r, _ in pairs]
    offsets, chars = compress(np.concatenate(runs), np.array([len(r) for r in runs]))
    data = chars.tobytes().decode("ascii")
    assert [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])] == [s for _, s in pairs]


def test_extreme_runs_and_zero_runs() -> None:
    """Runs near uint32's limit and zero-length runs (a mask that starts with foreground)."""
    for runs in ([0, 4_000_000_000, 1], [2**32 - 1], [0, 1, 0, 1, 2**31, 3, 2**31 + 5], [7, 0, 0, 0, 9]):
        r = np.array(runs, np.uint32)
        want = mask_utils.frPyObjects({"counts": r, "size": [1, int(r.astype(np.int64).sum())]}, 1,
                                      int(r.astype(np.int64).sum()))["counts"].decode()
        assert compress_one(r) == want


def test_no_masks_and_bad_lengths() -> None:
    offsets, chars = compress(np.zeros(0, np.uint32), np.zeros(0, np.int32))
    assert offsets.tolist() == [0] and chars.size == 0
    with pytest.raises(ValueError, match="lengths"):
        compress(np.array([1, 2], np.uint32), np.array([1]))


def test_encoding_stage_over_a_chunked_column_equals_pycocotools() -> None:
    """pipeline.stages.handoff.encode_column (the encoding stage) on a column in sliced chunks, as Ray Data hands
    it over: the same strings as pycocotools' encoder, ranks per image, and a bad image named by its
    index in the whole batch."""
    import pyarrow as pa
    from types import SimpleNamespace

    from pipeline.stages.handoff import encode_column, proposals_column

    masks = _masks()
    pairs = [_coco(m) for m in masks]

    def image(runs: np.ndarray, area: int) -> SimpleNamespace:  # one image with its one mask, twice
        return SimpleNamespace(scores=np.array([0.9, 0.5], np.float32), boxes=np.zeros((2, 4), np.float32),
                               areas=np.array([area, area]), scales=np.array([1, 1], np.int32),
                               counts=np.concatenate([runs, runs]), lengths=np.array([len(runs)] * 2))

    column = proposals_column([image(r, int(m.sum())) for m, (r, _) in zip(masks, pairs)])
    k = len(masks) // 2
    chunked = pa.chunked_array([column.slice(0, k), column.slice(k)])
    heights, widths = np.array([m.shape[0] for m in masks]), np.array([m.shape[1] for m in masks])
    rows = encode_column(chunked, heights, widths).to_pylist()
    assert [[p["rle"] for p in row] for row in rows] == [[s, s] for _, s in pairs]
    assert all([p["rank"] for p in row] == [0, 1] for row in rows)
    widths[k + 1] += 1  # image k + 1 (the second chunk's second): its runs no longer cover it
    with pytest.raises(ValueError, match=f"image {k + 1} of the batch"):
        encode_column(chunked, heights, widths)
