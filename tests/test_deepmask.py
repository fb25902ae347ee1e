"""DeepMask's heads on InstanceFCN's trunk: the dense conv form against a per-window FC on cropped
windows (slow reference), shapes, training through the shared loop, the shared predictor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ifcn import InferenceConfig, ModelConfig, Predictor, load_checkpoint
from ifcn.models.deepmask import DeepMask, crop_windows
from ifcn.models.registry import head_parameters
from ifcn.train.loss import deepmask_loss
from ifcn.ops.transforms import image_to_tensor, normalize, resize, scaled_size


def _loud(config: ModelConfig, seed: int = 0) -> DeepMask:
    """A random DeepMask whose output layers are loud enough for masks and scores to differ."""
    torch.manual_seed(seed)
    model = DeepMask(config).eval()
    torch.nn.init.normal_(model.mask_out.weight, std=0.3)
    torch.nn.init.normal_(model.score_out.weight, std=0.3)
    return model


def _reference_crop(x: torch.Tensor, y0: int, x0: int, m: int) -> torch.Tensor:
    """(C, h, w) -> (C, m, m), cell by cell, zero off the map."""
    c, h, w = x.shape
    out = torch.zeros(c, m, m, dtype=x.dtype)
    for i in range(m):
        for j in range(m):
            if 0 <= y0 + i < h and 0 <= x0 + j < w:
                out[:, i, j] = x[:, y0 + i, x0 + j]
    return out


def _reference_window(model: DeepMask, feats: torch.Tensor, y0: int, x0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepMask as the paper writes it, for one window: (m, m) mask logits, () objectness logit.

    feats: (C, h, w) trunk features. Mask: 1x1 conv + ReLU, crop, FC (low rank), FC. Score: crop,
    2x2 max pool (stride 2), FC + ReLU, FC + ReLU, FC."""
    m = model.config.m
    reduced = F.relu(F.conv2d(feats[None], model.mask_reduce.weight, model.mask_reduce.bias))[0]
    crop = _reference_crop(reduced, y0, x0, m).reshape(-1)
    low = model.mask_fc.weight.reshape(len(model.mask_fc.weight), -1) @ crop + model.mask_fc.bias
    mask = model.mask_out.weight.reshape(m * m, -1) @ low + model.mask_out.bias
    pooled = F.max_pool2d(_reference_crop(feats, y0, x0, m)[None], 2)[0].reshape(-1)
    h1 = F.relu(model.score_fc1.weight.reshape(len(model.score_fc1.weight), -1) @ pooled + model.score_fc1.bias)
    h2 = F.relu(model.score_fc2.weight[:, :, 0, 0] @ h1 + model.score_fc2.bias)
    score = model.score_out.weight[:, :, 0, 0] @ h2 + model.score_out.bias
    return mask.reshape(m, m), score[0]


@pytest.mark.parametrize("m", [21, 6, 2])
def test_dense_and_windowed_forms_equal_the_per_window_fc_on_crops(m: int) -> None:
    model = _loud(ModelConfig(backbone="vgg16_narrow", m=m, k=min(5, m)), seed=m)
    x = torch.randn(1, 3, 72, 88)  # features 9 x 11
    with torch.no_grad():
        feats = model.features(x)[0]
        masks, objectness = model(x)  # (1, m*m, 9, 11), (1, 1, 9, 11)
        h, w = feats.shape[-2:]
        # centres at the corners, the edges and inside; every window but the middle one runs off the map
        centres = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (1, w - 2), (h - 2, 3)]
        windows = torch.tensor([[0, cy - m // 2, cx - m // 2] for cy, cx in centres])
        win_masks, win_obj = model(x, windows)
        for n, (cy, cx) in enumerate(centres):
            ref_mask, ref_obj = _reference_window(model, feats, cy - m // 2, cx - m // 2)
            torch.testing.assert_close(masks[0, :, cy, cx].reshape(m, m), ref_mask, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(objectness[0, 0, cy, cx], ref_obj, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(win_masks[n], ref_mask, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(win_obj[n], ref_obj, atol=1e-4, rtol=1e-4)
        assert ref_mask.abs().max() > 0.1 and masks.std() > 0.01  # not trivially equal zeros


def test_crop_windows_matches_cell_by_cell_crops_with_steps() -> None:
    torch.manual_seed(1)
    feats = torch.randn(2, 3, 5, 7)
    windows = torch.tensor([[0, -2, -3], [1, 2, 4], [1, -9, 20], [0, 4, 6], [1, 0, 0]])
    for size, step in ((4, 1), (3, 2)):
        got = crop_windows(feats, windows, size, step)
        for n, (b, y0, x0) in enumerate(windows.tolist()):
            full = _reference_crop(feats[b], y0, x0, step * (size - 1) + 1)
            torch.testing.assert_close(got[n], full[:, ::step, ::step])


def test_shapes_and_empty_windows() -> None:
    model = DeepMask(ModelConfig(backbone="vgg16_narrow", m=9)).eval()
    with torch.no_grad():
        masks, objectness = model(torch.randn(2, 3, 50, 61))
        assert masks.shape == (2, 81, 7, 8) and objectness.shape == (2, 1, 7, 8)
        masks, objectness = model(torch.randn(1, 3, 50, 61), torch.tensor([[0, 1, 2], [0, -4, 5]]))
        assert masks.shape == (2, 9, 9) and objectness.shape == (2,)
        masks, objectness = model(torch.randn(1, 3, 50, 61), torch.zeros((0, 3), dtype=torch.long))
        assert masks.shape == (0, 9, 9) and objectness.shape == (0,)
    with pytest.raises(ValueError, match=r"expected images \(N, 3, H, W\)"):
        model(torch.randn(3, 50, 61))
    with pytest.raises(ValueError, match="m >= 2"):
        DeepMask(ModelConfig(backbone="vgg16_narrow", m=1, k=1))


def test_head_parameter_counts() -> None:
    """The counts the README reports: DeepMask's window FCs against InstanceFCN's small heads."""
    from ifcn import InstanceFCN

    c, r, cells = 128, 32, 21 * 21  # narrow trunk width, mask 1x1 width, window cells
    mask = (c * r + r) + (r * cells * c + c) + (c * cells + cells)  # 1x1, window FC to rank c, FC to 21 x 21
    score = (c * 10 * 10 * c + c) + (c * 2 * c + 2 * c) + (2 * c + 1)  # pooled 10 x 10 window FC, FC, FC
    assert head_parameters(DeepMask(ModelConfig(backbone="vgg16_narrow"))) == mask + score == 3_539_290
    ifcn_heads = (c * c + c) + (c * 25 * 9 + 25) + (c * c * 9 + c) + (c + 1)  # 1x1, 3x3 to k*k; 3x3, 1x1 to 1
    assert head_parameters(InstanceFCN(ModelConfig(backbone="vgg16_narrow"))) == ifcn_heads == 193_050


def test_window_logits_read_the_dense_masks_at_window_centres() -> None:
    model = _loud(ModelConfig(backbone="vgg16_narrow", m=5))
    masks = torch.randn(2, 25, 4, 6)
    windows = torch.tensor([[0, -2, -2], [1, 1, 3], [1, 2, 4], [0, -3, 0]])  # centres (0,0) (3,5) (4,6) (-1,2)
    got = model.window_logits(masks, windows)
    torch.testing.assert_close(got[0], masks[0, :, 0, 0].reshape(5, 5))
    torch.testing.assert_close(got[1], masks[1, :, 3, 5].reshape(5, 5))
    assert (got[2] < -10).all() and (got[3] < -10).all()  # centre off the map: background


def test_training_steps_reduce_the_loss() -> None:
    """The registry's DeepMask loss through the loop's step_loss (the same sampling as InstanceFCN)."""
    from ifcn.train.config import TrainConfig
    from ifcn.train.loop import step_loss
    from ifcn.train.sampling import Example

    torch.manual_seed(0)
    h = w = 160
    masks = torch.zeros(2, h, w)
    masks[0, 30:120, 20:100] = 1.0  # two 90 px objects, near the 96 px positive size
    masks[1, 50:140, 70:150] = 1.0
    example = Example(normalize(image_to_tensor((np.random.default_rng(0).random((h, w, 3)) * 60
                                                 + 120 * masks.amax(0)[..., None].numpy()).astype(np.uint8))),
                      masks, torch.tensor([[20.0, 30, 80, 90], [70, 50, 80, 90]]), torch.zeros(2, dtype=torch.bool), h)
    cfg = TrainConfig(images="unused", annotations="unused", output="unused", model="deepmask",
                      backbone="vgg16_narrow", windows_per_image=64)
    model = DeepMask(ModelConfig(backbone="vgg16_narrow")).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for step in range(12):
        loss, parts = step_loss(model, cfg, example, torch.Generator().manual_seed(step), torch.device("cpu"))
        assert set(parts) == {"objectness", "mask"} and parts["mask"] > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_deepmask_loss_is_the_windows_logistic_loss() -> None:
    """Against BCE written out on the per-window outputs: objectness over all, masks over positives."""
    from ifcn.train.sampling import Example, WindowBatch

    model = _loud(ModelConfig(backbone="vgg16_narrow", m=5), seed=3)
    image = torch.randn(1, 3, 40, 48)
    cells = torch.tensor([[1, 1], [2, 4], [4, 0], [0, 5]])  # (y, x) centres; the first two positive
    targets = (torch.rand(2, 5, 5) > 0.5).float()
    batch = WindowBatch(cells, torch.tensor([1.0, 1.0, 0.0, 0.0]), targets)
    example = Example(image, torch.zeros(0, 40, 48), torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), 40)
    loss, parts = deepmask_loss(model, example, batch, torch.device("cpu"))
    with torch.no_grad():
        feats = model.features(image)[0]
        refs = [_reference_window(model, feats, int(y) - 2, int(x) - 2) for y, x in cells]
    obj = torch.stack([r[1] for r in refs])
    p = torch.sigmoid(obj)
    want_obj = -(batch.labels * torch.log(p) + (1 - batch.labels) * torch.log(1 - p)).mean()
    q = torch.sigmoid(torch.stack([refs[0][0], refs[1][0]]))
    want_mask = -(targets * torch.log(q) + (1 - targets) * torch.log(1 - q)).mean()
    assert parts["objectness"] == pytest.approx(float(want_obj), rel=1e-4)
    assert parts["mask"] == pytest.approx(float(want_mask), rel=1e-4)
    assert float(loss) == pytest.approx(float(want_obj + want_mask), rel=1e-4)


def test_shared_predictor_runs_deepmask_with_its_per_window_masks(tmp_path) -> None:
    """Through a checkpoint (kind deepmask) into ifcn.Predictor: the candidates are the best windows
    by DeepMask's objectness and their masks its per-window masks; proposals are valid RLE."""
    from ifcn.models.checkpoint import read_checkpoint, save_checkpoint

    url = str(tmp_path / "dm.pt")
    save_checkpoint(_loud(ModelConfig(backbone="vgg16_narrow", m=9)), url)
    assert read_checkpoint(url)["kind"] == "deepmask"
    model = load_checkpoint(url)
    assert isinstance(model, DeepMask)
    image = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    config = InferenceConfig(scales=(64,), windows_per_scale=12, max_proposals=5)
    predictor = Predictor(model, config, device="cpu")
    cands = predictor.candidates(image)
    size = scaled_size(60, 80, 64, config.max_size)
    with torch.no_grad():
        x = normalize(resize(image_to_tensor(image), size))
        _, objectness = model(x)
        best = torch.topk(objectness.reshape(-1), 12)
        fw = objectness.shape[-1]
        want_cells = torch.stack([best.indices // fw - 4, best.indices % fw - 4], 1)
        np.testing.assert_allclose(np.sort(cands.scores), np.sort(torch.sigmoid(best.values).numpy()), rtol=1e-5)
        windows = torch.cat([torch.zeros(len(cands.cells), 1, dtype=torch.long),
                             torch.from_numpy(cands.cells.astype(np.int64))], 1)
        want_masks, _ = model(x, windows)
    assert {tuple(c) for c in cands.cells.tolist()} == {tuple(c) for c in want_cells.tolist()}
    np.testing.assert_allclose(cands.masks, torch.sigmoid(want_masks).numpy(), atol=1e-5)
    props = predictor.predict(image)
    assert 0 < len(props) <= 5
    assert [p["score"] for p in props] == sorted((p["score"] for p in props), reverse=True)
    for p in props:
        assert mask_utils.decode(p["rle"]).shape == (60, 80) and int(mask_utils.area(p["rle"])) == p["area"] > 0
