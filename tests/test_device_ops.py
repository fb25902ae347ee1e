"""The device half of inference (torch: ifcn.ops.boxes, ifcn.ops.paste, ifcn.ops.nms, ifcn.ops.runs, ifcn.batch.postprocessing and its steps)
against the numpy references beside them (and proposals.postprocess_numpy), on CPU:
the same torch code runs on CUDA.

float64 blending must reproduce the reference bit for bit; float32 (the GPU default) may differ
only for pixels within rounding of the threshold, which these inputs avoid.
Run: pytest tests/test_device_ops.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ifcn.batch.containers import Windows
from ifcn import Candidates, InferenceConfig, InstanceFCN, Predictor, postprocess_device, postprocess_numpy
from ifcn.ops.boxes import search_steps, tight_boxes
from ifcn.ops.nms import box_nms, greedy_keep
from ifcn.ops.paste import paste_dense, paste_masks
from ifcn.ops.runs import crop_runs
from test_ops import _crop_cases, _random_masks, _reference_nms, _tight_crop


def _windows(probs: np.ndarray, cells: np.ndarray, factor: tuple[float, float]) -> Windows:
    n = len(probs)
    return Windows(torch.linspace(1, 0, n, dtype=torch.float32), torch.from_numpy(cells).long(),
                       torch.from_numpy(probs), torch.tensor(factor, dtype=torch.float64).expand(n, 2),
                       torch.full((n,), 100, dtype=torch.long))


def _paste_cases():
    for m, factor, image_size, seed in [(7, (1.0, 1.0), (40, 50), 0), (7, (0.5, 0.75), (30, 37), 1),
                                        (5, (2.0, 1.5), (61, 47), 2), (6, (0.37, 1.9), (23, 71), 3),
                                        (21, (1.25, 1.25), (96, 80), 4), (21, (0.213, 0.2), (130, 170), 5)]:
        rng = np.random.default_rng(seed)
        stride = 8
        fh, fw = math.ceil(image_size[0] * factor[0] / stride), math.ceil(image_size[1] * factor[1] / stride)
        cells = np.stack([rng.integers(-m - 1, fh + 1, 12), rng.integers(-m - 1, fw + 1, 12)], axis=1)
        cells = np.concatenate([cells, [[-m // 2, -m // 2], [fh - m // 2, fw - m // 2], [0, fw], [-m, 0],
                                        [fh - m, fw - m]]]).astype(np.int64)
        probs = rng.random((len(cells), m, m))
        probs[0] = 1.0
        probs[1] = np.where(rng.random((m, m)) < 0.3, 0.9, 0.1)
        probs[2] = 0.0
        probs[2, 1:3, m // 2:] = 0.9  # sparse
        probs[3] = 0.0  # empty
        # smooth blobs: what trained masks look like (a peak inside, falling off)
        yy, xx = np.mgrid[:m, :m]
        for i in range(4, 8):
            cy, cx, r = rng.uniform(0, m, 3)
            probs[i] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1 + r) ** 2))
        yield m, factor, image_size, cells, probs.astype(np.float32)


def _boxes(w: Windows, image_size: tuple[int, int], m: int, factor: tuple[float, float],
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    n = len(w)
    return tight_boxes(w.probs, w.cells, w.factor, torch.tensor(image_size).expand(n, 2), m, 8, 0.5,
                       search_steps(min(factor), 8), dtype)


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_tight_boxes_match_reference(case: int, dtype: torch.dtype) -> None:
    m, factor, image_size, cells, probs = list(_paste_cases())[case]
    ref = paste_masks(probs, cells, factor, image_size, 8, 0.5)
    w = _windows(probs, cells, factor)
    boxes = _boxes(w, image_size, m, factor, dtype)
    assert boxes.dtype == torch.long and boxes.shape == (len(cells), 4)
    for i, (top, left, crop) in enumerate(ref):
        want = [left, top, left + crop.shape[1], top + crop.shape[0]] if crop.size else [0, 0, 0, 0]
        assert boxes[i].tolist() == want, f"window {i}"


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_paste_dense_matches_reference(case: int, dtype: torch.dtype) -> None:
    """Every window over its tight box in one padded block (larger than every box): the reference's crop
    at [i, :w, 1:h + 1] (column-major), False everywhere else (the zero rows and the padding)."""
    m, factor, image_size, cells, probs = list(_paste_cases())[case]
    ref = paste_masks(probs, cells, factor, image_size, 8, 0.5)
    w = _windows(probs, cells, factor)
    boxes = _boxes(w, image_size, m, factor, dtype)
    width, height = int((boxes[:, 2] - boxes[:, 0]).max()) + 3, int((boxes[:, 3] - boxes[:, 1]).max()) + 2
    v = paste_dense(w.probs, w.cells, w.factor, boxes, (width, height), m, 8, 0.5, dtype)
    assert v.shape == (len(cells), width, height + 2) and v.dtype == torch.bool
    for i, (top, left, crop) in enumerate(ref):
        want = np.zeros((height + 2, width), bool)
        want[1:1 + crop.shape[0], :crop.shape[1]] = crop
        np.testing.assert_array_equal(v[i].numpy().T, want, err_msg=f"window {i}")


def test_paste_products_never_run_below_float32_and_set_no_switch() -> None:
    """With reduced-precision float32 products switched on for the process (TF32 on CUDA; here the CPU's
    oneDNN equivalent, set the same way), paste_dense's float32 products run in float64 and still give
    the reference's masks; switched off, in float32. No module of ifcn sets or restores the switches."""
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    from ifcn.ops.paste import full_float32_products

    class Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.dtypes: set[torch.dtype] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.bmm.default:
                self.dtypes.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    m, factor, image_size, cells, probs = list(_paste_cases())[4]
    ref = paste_masks(probs, cells, factor, image_size, 8, 0.5)
    w = _windows(probs, cells, factor)
    boxes = _boxes(w, image_size, m, factor)
    shape = (int((boxes[:, 2] - boxes[:, 0]).max()), int((boxes[:, 3] - boxes[:, 1]).max()))
    for precision, product in (("high", torch.float64), ("highest", torch.float32)):
        torch.set_float32_matmul_precision(precision)
        try:
            assert full_float32_products(torch.device("cpu")) == (product == torch.float32)
            with Products() as spy:
                v = paste_dense(w.probs, w.cells, w.factor, boxes, shape, m, 8, 0.5, torch.float32)
        finally:
            torch.set_float32_matmul_precision("highest")
        assert spy.dtypes == {product}, precision
        for i, (_, _, crop) in enumerate(ref):
            np.testing.assert_array_equal(v[i, :crop.shape[1], 1:1 + crop.shape[0]].numpy().T, crop)
    sources = "".join(f.read_text() for f in (Path(__file__).parents[1] / "ifcn").rglob("*.py"))
    for switch in ("allow_tf32 =", "set_float32_matmul_precision(", "fp32_precision ="):
        assert switch not in sources


@pytest.mark.parametrize("seed", range(4))
def test_tight_boxes_match_reference_on_random_geometry(seed: int) -> None:
    """Any m, factors from 0.05 to 2.5 (segments of 1 to 240 pixels), windows off every border."""
    rng = np.random.default_rng(seed)
    for _ in range(30):
        m = int(rng.integers(2, 22))
        factor = (float(np.float32(rng.uniform(0.05, 2.5))), float(np.float32(rng.uniform(0.05, 2.5))))
        size = (int(rng.integers(5, 200)), int(rng.integers(5, 200)))
        fh, fw = math.ceil(size[0] * factor[0] / 8), math.ceil(size[1] * factor[1] / 8)
        cells = np.stack([rng.integers(-m - 1, fh + 1, 20), rng.integers(-m - 1, fw + 1, 20)], 1).astype(np.int64)
        probs = (rng.random((20, m, m)) ** rng.uniform(0.2, 6)).astype(np.float32)
        got = _boxes(_windows(probs, cells, factor), size, m, factor)
        for i, (top, left, crop) in enumerate(paste_masks(probs, cells, factor, size, 8, 0.5)):
            want = [left, top, left + crop.shape[1], top + crop.shape[0]] if crop.size else [0, 0, 0, 0]
            assert got[i].tolist() == want, (m, factor, size, i)


def test_tight_boxes_of_no_windows() -> None:
    m, factor, image_size, cells, probs = list(_paste_cases())[5]
    w = _windows(probs, cells, factor)
    assert _boxes(w.take(torch.zeros(0, dtype=torch.long)), image_size, m, factor).shape == (0, 4)


@pytest.mark.parametrize("case", range(len(_crop_cases())))
def test_dense_runs_match_reference(case: int) -> None:
    """Each crop case after a one-pixel mask at (0, 0) and before a full-height one, in paste_dense's
    layout (one padded block, in a plan order unlike the windows' order, a second block for the
    full-height one): run events and counts (pasteruns._step_events, _counts) as ops.crop_runs
    gives them (which tests/test_ops.py checks against pycocotools)."""
    from ifcn.batch.pasteplan import step_table
    from ifcn.batch.pasteruns import _counts, _step_events

    image_size, top, left, crop = _crop_cases()[case]
    if not crop.any():
        return  # kept masks are never empty
    rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
    top, left = top + rows[0], left + cols[0]
    crop = crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fw = min(2, image_size[1])  # two columns where the image has them
    full = np.ones((image_size[0], fw), bool)
    full[1:-1, 0] = False  # a hole inside one column (tight: its ends stay on)
    crops = [np.ones((1, 1), bool), crop, full]
    placed = [(0, 0), (top, left), (0, image_size[1] - fw)]
    order = [1, 0, 2]  # plan order: block 0 holds windows 1 and 0, block 1 window 2
    width, height = max(c.shape[1] for c in crops[:2]) + 1, max(c.shape[0] for c in crops[:2]) + 1
    blocks = [np.zeros((2, width, height + 2), bool), np.zeros((1, fw, image_size[0] + 2), bool)]
    for slot, i in enumerate(order):
        block = blocks[0][slot] if slot < 2 else blocks[1][0]
        block[:crops[i].shape[1], 1:1 + crops[i].shape[0]] = crops[i].T
    buffer = torch.from_numpy(np.concatenate([b.reshape(-1) for b in blocks]))
    boxes = torch.tensor([[x, y, x + c.shape[1], y + c.shape[0]] for (y, x), c in zip(placed, crops)])
    at = torch.tensor(order)
    hw = torch.tensor(image_size).expand(3, 2)
    events = _step_events(buffer, step_table([(0, 2, width, height), (2, 3, fw, image_size[0])], True), boxes[at], hw[at])
    counts, lengths = _counts([events], at, 3, hw)
    got = np.split(counts.numpy()[:int(lengths.sum())], np.cumsum(lengths.numpy())[:-1])
    for g, (y, x), c in zip(got, placed, crops):
        np.testing.assert_array_equal(g, crop_runs(y, x, c, image_size))


def _reference_greedy(suppress: np.ndarray, alive: np.ndarray) -> np.ndarray:
    kept = np.zeros(len(alive), bool)
    for i in range(len(alive)):
        kept[i] = alive[i] and not any(suppress[i, j] and kept[j] for j in range(i))
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_greedy_keep_equals_sequential_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 80
    suppress = rng.random((n, n)) < [0.02, 0.05, 0.2, 0.5, 0.9, 0.0][seed]
    if seed == 0:  # a long chain: each suppresses the next, so the kept set alternates
        suppress[:] = False
        suppress[np.arange(1, n), np.arange(n - 1)] = True
    alive = rng.random(n) < 0.9
    got = greedy_keep(torch.from_numpy(suppress), torch.from_numpy(alive)).numpy()
    np.testing.assert_array_equal(got, _reference_greedy(np.tril(suppress, -1), alive))
    # a batch of two problems at once: each row its own answer
    both = greedy_keep(torch.from_numpy(np.stack([suppress, suppress.T])), torch.from_numpy(np.stack([alive, alive])))
    np.testing.assert_array_equal(both[0].numpy(), got)
    np.testing.assert_array_equal(both[1].numpy(), _reference_greedy(np.tril(suppress.T, -1), alive))


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_box_nms_matches_brute_force(iou_threshold: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 60)
    scores = rng.random(60)
    scores[5:10] = scores[0]
    order = np.argsort(-scores, kind="stable")
    boxes = []
    for mk in masks[order]:
        top, left, crop = _tight_crop(mk)
        boxes.append([left, top, left + crop.shape[1], top + crop.shape[0]])
    box_masks = np.zeros_like(masks)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        box_masks[order[i], y0:y1, x0:x1] = True  # box IoU = IoU of the filled boxes
    for max_keep in (1000, 7):
        # two images at once: this one, and its first 30 windows (padded: not alive)
        batch = torch.tensor(boxes)[None].repeat(2, 1, 1)
        alive = torch.ones((2, 60), dtype=torch.bool)
        alive[1, 30:] = False
        pos, real = box_nms(batch, alive, iou_threshold, max_keep)
        assert pos.shape == (2, min(max_keep, 60))
        kept = pos[0][real[0]].numpy()
        assert order[kept].tolist() == _reference_nms(box_masks, scores, iou_threshold, max_keep)
        sub = order[:30]
        want = _reference_nms(box_masks[sub], scores[sub], iou_threshold, max_keep)
        assert sub[pos[1][real[1]].numpy()].tolist() == [sub[i] for i in want]


# ----------------------------------------------------------------------------- whole postprocess

def _image(seed: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random((*size, 3)) * 60).astype(np.uint8)
    for _ in range(5):
        y, x = rng.integers(0, size[0] - 10), rng.integers(0, size[1] - 10)
        img[y:y + int(rng.integers(8, 30)), x:x + int(rng.integers(8, 30))] = rng.integers(0, 256, 3)
    return img


def _assert_same(a, b, score_rtol: float = 0.0) -> None:
    """Same proposals; scores to `score_rtol` (a batched conv may sum in another order than a single one)."""
    assert a.image_size == b.image_size
    np.testing.assert_allclose(a.scores, b.scores, rtol=score_rtol, atol=0)
    for field in ("boxes", "areas", "scales", "counts", "lengths"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("nms", ["box", "mask"])
@pytest.mark.parametrize("kw", [{}, {"max_proposals": 5}, {"max_proposals": 3, "nms_iou": 0.3},
                                {"min_score": 0.5}, {"nms_iou": 1.0}])
def test_postprocess_device_equals_numpy_reference(model: InstanceFCN, nms: str, kw: dict) -> None:
    config = InferenceConfig(**{"scales": (40, 56, 88), "windows_per_scale": 60, "max_proposals": 40, "nms": nms, **kw})
    predictor = Predictor(model, config, device="cpu")
    for seed, size in ((0, (50, 70)), (1, (83, 41))):
        image = _image(seed, size)
        groups = predictor.windows([image])[0]
        want = postprocess_numpy(Candidates.from_windows(groups, size, 8), config)
        assert len(want) > 0
        _assert_same(postprocess_device(groups, size, config, 21, 8, torch.float64), want)
        _assert_same(postprocess_device(groups, size, config, 21, 8, torch.float32), want)


def _small_mask_budgets(mp: pytest.MonkeyPatch, round_: int = 3, pair_pixels: int = 50) -> None:
    """Mask NMS in rounds of `round_` windows per image, pair bounds a few rows a block,
    intersections `pair_pixels` a step and pastes of 300 pixels: many rounds and many tiny steps."""
    import ifcn.batch.budgets as budgets
    import ifcn.ops.nms as nms

    mp.setitem(budgets.MASK_ROUND, "cpu", round_)
    mp.setitem(budgets.PAIR_PIXEL_BUDGET, "cpu", pair_pixels)
    mp.setitem(budgets.PIXEL_BUDGET, "cpu", 300)
    mp.setitem(nms.IOU_BLOCK, "cpu", 100)  # (B, rows, K + R) elements: a few rows a block


def test_mask_nms_rounds_and_chunks(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mask NMS in rounds of 3 windows, pair bounds, intersections and pastes in tiny steps."""
    config = InferenceConfig(scales=(40, 56, 88), windows_per_scale=80, max_proposals=12, nms="mask", nms_iou=0.3)
    image = _image(2, (64, 64))
    groups = Predictor(model, config, device="cpu").windows([image])[0]
    want = postprocess_numpy(Candidates.from_windows(groups, (64, 64), 8), config)
    _small_mask_budgets(monkeypatch)
    _assert_same(postprocess_device(groups, (64, 64), config, 21, 8, torch.float64), want)


@pytest.mark.parametrize("kw", [{"max_proposals": 12, "nms_iou": 0.3}, {"max_proposals": 40, "nms_iou": 0.8},
                                {"max_proposals": 5, "nms_iou": 0.5, "min_score": 0.5}])
def test_mask_nms_of_a_batch_equals_reference_per_image(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch,
                                                        kw: dict) -> None:
    """Images of different sizes (and windows) in one batch, mask NMS of all at once in many rounds
    and tiny steps: each image's proposals are postprocess_numpy's on its own candidates, and the
    same as with the default budgets (some images fill up rounds before others)."""
    from ifcn.batch.postprocessing import postprocess_batch

    config = InferenceConfig(**{"scales": (40, 56, 88), "windows_per_scale": 100, "nms": "mask", **kw})
    predictor = Predictor(model, config, device="cpu", postprocess_on="device")
    images = [_image(0, (50, 70)), _image(4, (24, 20)), _image(3, (83, 41)), _image(1, (64, 64))]
    batch = predictor.windows(images)
    whole = postprocess_batch(batch, config, 21, 8, torch.float64)
    import ifcn.batch.masknms as masknms

    rounds = []
    with monkeypatch.context() as mp:
        _small_mask_budgets(mp, round_=8, pair_pixels=2000)
        widths = masknms._round_widths
        mp.setattr(masknms, "_round_widths", lambda *a: rounds.append(widths(*a)) or rounds[-1])
        steps = postprocess_batch(batch, config, 21, 8, torch.float64)
    assert len(rounds) > 2 and any(len(set(w.tolist())) > 1 for w in rounds)  # many rounds, some images finish first
    assert len({int(v) for v in batch.valid.sum(1)}) > 1  # images with different numbers of windows
    for got, one, cands in zip(steps, whole, batch.candidates(8)):
        want = postprocess_numpy(cands, config)
        assert len(want) > 0
        _assert_same(got, want)
        _assert_same(one, want)


@pytest.mark.parametrize("kw", [{"max_proposals": 40, "nms_iou": 0.8}, {"max_proposals": 12, "nms_iou": 0.3}])
def test_mask_nms_store_budget_crossed_equals_reference_per_image(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch,
                                                                  kw: dict) -> None:
    """A store budget of a few masks: rounds capped by pixels to a few windows an image, kept masks
    past half of it re-pasted in chunks for each round. Images of different sizes in one batch: each
    one's proposals are postprocess_numpy's on its own candidates, and the store stays within the
    budget but for the one window an image a round always takes."""
    import ifcn.batch.budgets as budgets
    import ifcn.batch.masknms as masknms
    from ifcn.batch.postprocessing import postprocess_batch

    config = InferenceConfig(**{"scales": (40, 56, 88), "windows_per_scale": 100, "nms": "mask", **kw})
    predictor = Predictor(model, config, device="cpu", postprocess_on="device")
    images = [_image(0, (50, 70)), _image(4, (24, 20)), _image(3, (83, 41)), _image(1, (64, 64))]
    batch = predictor.windows(images)
    budget = 40_000

    boxes: list[int] = []  # the largest window box, from _round_widths' cumulative box pixels

    def run(store_budget: int) -> tuple[list, list[int], list[int], list[int]]:
        lengths, chunks, rounds = [], [], []  # store lengths read, chunked rounds, round widths
        inter, chunked, widths = masknms.intersections, masknms._chunked_intersections, masknms._round_widths

        def read(store: torch.Tensor, *a):
            lengths.append(len(store))
            return inter(store, *a)

        def chunked_round(*a):
            chunks.append(1)
            return chunked(*a)

        def round_widths(*a):
            boxes.append(int(np.diff(a[5], axis=1).max()))
            rounds.append(int(widths(*a).max()))
            return widths(*a)

        with monkeypatch.context() as mp:
            mp.setitem(budgets.STORE_PIXEL_BUDGET, "cpu", store_budget)
            for name, f in [("intersections", read), ("_chunked_intersections", chunked_round),
                            ("_round_widths", round_widths)]:
                mp.setattr(masknms, name, f)
            return postprocess_batch(batch, config, 21, 8, torch.float64), lengths, chunks, rounds

    whole, free_lengths, free_chunks, free_rounds = run(1 << 30)
    capped, lengths, chunks, rounds = run(budget)
    assert not free_chunks and max(free_lengths) > 3 * budget  # unbounded: everything stored
    assert chunks and len(lengths) > len(chunks) + len(rounds)  # chunked rounds, several chunks each
    assert max(rounds) < max(free_rounds) and len(rounds) > len(free_rounds)  # rounds capped by pixels
    # + the one window a round takes of an image whatever the budget, and a chunk's last kept mask
    assert max(lengths) <= budget + (len(images) + 1) * max(boxes)
    for got, one, cands in zip(capped, whole, batch.candidates(8)):
        want = postprocess_numpy(cands, config)
        assert len(want) > 0
        _assert_same(got, want)
        _assert_same(one, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_pixel_budget_crossed_still_equals_reference(model: InstanceFCN, dtype: torch.dtype) -> None:
    """Kept masks pasted in many small steps (a budget of 300 pixels: most masks alone, and a mask
    larger than the budget in a step of its own): the same proposals as one step and the reference."""
    from ifcn.batch.postprocessing import postprocess_batch

    config = InferenceConfig(scales=(40, 56, 88), windows_per_scale=60, max_proposals=40)
    predictor = Predictor(model, config, device="cpu", postprocess_on="device")
    images = [_image(0, (50, 70)), _image(1, (50, 70)), _image(3, (83, 41))]
    batch = predictor.windows(images)
    whole = postprocess_batch(batch, config, 21, 8, dtype)
    steps = postprocess_batch(batch, config, 21, 8, dtype, pixel_budget=300)
    assert max(int(np.max(p.areas)) for p in whole) > 300
    for got, one, cands in zip(steps, whole, batch.candidates(8)):
        _assert_same(got, one)
        _assert_same(got, postprocess_numpy(cands, config))


def test_batched_windows_equal_one_by_one(model: InstanceFCN) -> None:
    config = InferenceConfig(scales=(40, 72), windows_per_scale=30, max_proposals=20)
    predictor = Predictor(model, config, device="cpu", postprocess_on="device")
    images = [_image(0, (50, 70)), _image(1, (50, 70)), _image(2, (70, 50)), _image(3, (50, 70))]
    together = predictor.proposals(images)
    for image, got in zip(images, together):
        _assert_same(got, predictor.proposals([image])[0], score_rtol=1e-5)


def test_padded_batches_never_window_or_paint_the_padding(model: InstanceFCN) -> None:
    config = InferenceConfig(scales=(40, 72), windows_per_scale=500, max_proposals=200, pad_to=64, nms_iou=1.0)
    predictor = Predictor(model, config, device="cpu", postprocess_on="device")
    images = [_image(0, (50, 70)), _image(1, (45, 66)), _image(2, (33, 61))]
    together = predictor.proposals(images)
    groups = predictor.windows(images)
    for image, got, g in zip(images, together, groups):
        h, w = image.shape[:2]
        # an image's result does not depend on its batch mates
        _assert_same(got, predictor.proposals([image])[0], score_rtol=1e-5)
        for win, (fy, fx) in g:
            fh, fw = math.ceil(round(h * fy) / 8), math.ceil(round(w * fx) / 8)
            centres = win.cells + 21 // 2
            assert len(win) == min(500, fh * fw)  # every window of the image's own map, none of the padding
            assert ((centres >= 0) & (centres < torch.tensor([fh, fw]))).all()
        x, y, bw, bh = got.boxes.T
        assert (x >= 0).all() and (y >= 0).all() and (x + bw <= w).all() and (y + bh <= h).all()


# ----------------------------------------------------------------------------- no hidden syncs

def test_upload_pins_and_copies_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """ifcn.ops.upload to a non-CPU device (here 'meta', which any machine has): the source is pinned
    first and the copy is non-blocking; to the CPU nothing is copied."""
    from ifcn.ops import upload as up

    calls = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: getattr(t, "_pinned", False))

    def pin(t):
        calls.append("pin")
        t._pinned = True
        return t

    def to(t, *args, **kwargs):
        calls.append(("to", getattr(t, "_pinned", False), kwargs.get("non_blocking", False)))
        return real_to(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    out = up.upload(np.arange(6).reshape(2, 3), torch.device("meta"))
    assert out.device.type == "meta" and out.shape == (2, 3)
    assert calls == ["pin", ("to", True, True)]
    calls.clear()
    host = up.upload(np.arange(3), "cpu")
    assert calls == [] and host.tolist() == [0, 1, 2]
    a = up.constant((1.0, 2.0), torch.device("cpu"), torch.float32)
    assert a is up.constant((1.0, 2.0), torch.device("cpu"), torch.float32)  # made once


# The batched inference path (Predictor.windows -> postprocess_batch): host-to-device copies spelled
# outside ifcn.ops.upload wait for the stream from pageable memory. (assembling's `.to(device=...)` runs
# only for windows given on another device; containers' from_groups serves the per-image groups API.)
_HOT_PATH = ("ifcn/inference/predictor.py", "ifcn/batch/postprocessing.py", "ifcn/batch/tightboxes.py", "ifcn/batch/boxnms.py", "ifcn/batch/masknms.py",
             "ifcn/batch/maskpairs.py", "ifcn/batch/pasteplan.py", "ifcn/batch/pasteruns.py", "ifcn/ops/boxes.py", "ifcn/ops/paste.py",
             "ifcn/ops/runs.py", "ifcn/ops/nms.py", "ifcn/ops/transforms.py")


def _uploads_in(source: str) -> list[str]:
    """Calls that put host data on a device: torch.tensor/as_tensor(..., device=...), new_tensor(...),
    .to(<a device>) / .to(device=...) / .cuda()."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        kw = {k.arg for k in node.keywords}
        text = ast.unparse(node)
        if name in ("tensor", "as_tensor") and "device" in kw:
            found.append(text)
        elif name in ("new_tensor", "cuda"):
            found.append(text)
        elif name == "to" and ("device" in kw or any("dev" in ast.unparse(a) for a in node.args)):
            found.append(text)
    return found


def test_no_upload_outside_ifcn_upload() -> None:
    """The inference path puts host data on the device only through ifcn.ops.upload (pinned, non-blocking);
    moving the model (`model.to(self.device, ...)`, once) is the one exception."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = {p: _uploads_in((root / p).read_text()) for p in _HOT_PATH}
    found["ifcn/inference/predictor.py"] = [c for c in found["ifcn/inference/predictor.py"] if not c.startswith("model.to(")]
    assert not any(found.values()), found
    # the check can fail: what the hot path once held
    assert _uploads_in("side = torch.tensor([False, True], device=dev)") and _uploads_in("m = x.new_tensor((1, 2))")
    assert _uploads_in("t = t.to(device)") and not _uploads_in("t = t.to(torch.float64)")


# ----------------------------------------------------------------------------- empty masks, float32

def test_device_path_emits_no_empty_masks() -> None:
    """Windows whose pasted mask is empty (all-zero grids, here the best scored too) give no proposal
    on the device path either (box and mask NMS, float64 and float32): the numpy reference's proposals
    exactly, every area > 0 and one proposal per non-empty window when nothing suppresses."""
    m, factor, size, cells, probs = list(_paste_cases())[0]
    probs = probs.copy()
    probs[[0, 3, 5, 9]] = 0.0
    groups = [(_windows(probs, cells, factor), factor)]
    nonempty = sum(crop.size > 0 for _, _, crop in paste_masks(probs, cells, factor, size, 8, 0.5))
    assert 0 < nonempty < len(probs) - 3
    for nms in ("box", "mask"):
        config = InferenceConfig(scales=(100,), max_proposals=100, nms=nms, nms_iou=1.0)
        want = postprocess_numpy(Candidates.from_windows(groups, size, 8), config)
        for dtype in (torch.float64, torch.float32):
            got = postprocess_device(groups, size, config, m, 8, dtype)
            assert len(got.areas) == nonempty and (got.areas > 0).all(), (nms, dtype, got.areas)
            _assert_same(got, want)


def test_float32_within_tolerance_on_realistic_input() -> None:
    """A 480x640 synthetic scene and the shipped model (checkpoints/narrow_synth.pt) at the paper's
    scales, 1000 kept: float64 on the device equals the numpy reference exactly; float32 (the GPU
    default) is held to a stated tolerance: the count within 1%, every float64 proposal has a
    float32 one of mask IoU >= 0.99, and the areas at equal ranks differ by <= 0.1% of the total
    (measured here: no difference at all; the issue saw 1-3 pixels per image from rank ~200 on)."""
    import dataclasses
    from pathlib import Path

    from pycocotools import mask as mask_utils

    from ifcn import load_checkpoint
    from ifcn.data.synth import SynthConfig, render_image
    from ifcn.batch.postprocessing import postprocess_batch
    from ifcn.inference.proposals import encode

    model = load_checkpoint(str(Path(__file__).resolve().parents[1] / "checkpoints" / "narrow_synth.pt"))
    image = np.ascontiguousarray(render_image(np.random.default_rng(0), dataclasses.replace(SynthConfig(), size=640))[0][:480])
    config = InferenceConfig(windows_per_scale=400, max_proposals=1000)
    batch = Predictor(model, config, "cpu", postprocess_on="device").windows([image])
    want = postprocess_numpy(batch.candidates(8)[0], config)
    assert len(want.areas) > 500
    _assert_same(postprocess_batch(batch, config, 21, 8, torch.float64)[0], want)
    got = postprocess_batch(batch, config, 21, 8, torch.float32)[0]
    assert abs(len(got.areas) - len(want.areas)) <= len(want.areas) // 100
    a, b = encode(want), encode(got)
    ious = np.asarray(mask_utils.iou([p["rle"] for p in a], [p["rle"] for p in b], [0] * len(b))).reshape(len(a), len(b))
    assert ious.max(1).min() >= 0.99
    n = min(len(a), len(b))
    assert np.abs(got.areas[:n] - want.areas[:n]).sum() <= 0.001 * want.areas.sum()


def test_mask_nms_computes_tight_boxes_only_ahead_of_its_rounds(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mask NMS fetches tight boxes a round ahead (MASK_ROUND positions past the next round's start), so
    positions past the point where an image has max_proposals kept are never computed; results are
    the reference's."""
    import ifcn.batch.budgets as budgets
    import ifcn.batch.masknms as masknms
    from ifcn.batch.postprocessing import postprocess_batch

    config = InferenceConfig(scales=(40, 56, 88), windows_per_scale=100, max_proposals=6, nms="mask")
    images = [_image(0, (50, 70)), _image(3, (83, 41))]
    batch = Predictor(model, config, device="cpu", postprocess_on="device").windows(images)
    computed = []
    tight = masknms.tight_boxes_at
    monkeypatch.setattr(masknms, "tight_boxes_at", lambda b, idx, *a: computed.append(idx.numel()) or tight(b, idx, *a))
    monkeypatch.setitem(budgets.MASK_ROUND, "cpu", 8)
    got = postprocess_batch(batch, config, 21, 8, torch.float64)
    assert 0 < sum(computed) <= batch.scores.numel() // 3, (computed, batch.scores.shape)
    for one, cands in zip(got, batch.candidates(8)):
        _assert_same(one, postprocess_numpy(cands, config))
