"""InstanceFCN's layout, output shapes and ImageNet VGG-16 weight loading.

Run: pytest tests/test_model.py -q
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ifcn import InstanceFCN, ModelConfig, load_vgg16_weights

# torchvision vgg16().features: index -> (out, in) of each of the 13 convs.
VGG16_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
               14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
               28: (512, 512)}


def torchvision_vgg16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in torchvision vgg16's exact `features.*` key layout and shapes.

    The classifier.* keys carry torchvision's names but tiny shapes (the real fc6 is 400 MB);
    the loader must ignore them whatever their shape.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (out_ch, in_ch) in VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g)
        state[f"features.{i}.bias"] = torch.randn(out_ch, generator=g)
    for i in (0, 3, 6):
        state[f"classifier.{i}.weight"] = torch.randn(4, 3, generator=g)
        state[f"classifier.{i}.bias"] = torch.randn(4, generator=g)
    return state


@pytest.fixture(scope="module")
def vgg16() -> InstanceFCN:
    return InstanceFCN(ModelConfig()).eval()  # the only full VGG-16 built in this file


@pytest.mark.parametrize("height,width", [(33, 17), (8, 8), (1, 1), (64, 41), (57, 99)])
def test_output_shapes_are_ceil_stride_8(height: int, width: int) -> None:
    torch.manual_seed(0)
    model = InstanceFCN(ModelConfig("vgg16_narrow")).eval()
    with torch.no_grad():
        scores, objectness = model(torch.randn(2, 3, height, width))
    h, w = math.ceil(height / 8), math.ceil(width / 8)
    assert scores.shape == (2, 25, h, w)
    assert objectness.shape == (2, 1, h, w)
    assert torch.isfinite(scores).all() and torch.isfinite(objectness).all()


def test_k_sets_score_maps() -> None:
    model = InstanceFCN(ModelConfig("vgg16_narrow", k=3, m=9)).eval()
    with torch.no_grad():
        scores, _ = model(torch.randn(1, 3, 24, 24))
    assert scores.shape == (1, 9, 3, 3)


def test_forward_rejects_bad_input() -> None:
    model = InstanceFCN(ModelConfig("vgg16_narrow"))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 16, 16))


def test_vgg16_layer_layout(vgg16: InstanceFCN) -> None:
    convs = {i: mod for i, mod in enumerate(vgg16.features) if isinstance(mod, nn.Conv2d)}
    assert list(convs) == list(VGG16_CONVS)  # 13 convs at torchvision's indices
    for i, conv in convs.items():
        assert (conv.out_channels, conv.in_channels) == VGG16_CONVS[i]
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        want_dilation = 2 if i >= 24 else 1  # conv5_x: the hole algorithm
        assert conv.dilation == (want_dilation, want_dilation) and conv.padding == (want_dilation,) * 2
    pools = [(i, mod) for i, mod in enumerate(vgg16.features) if isinstance(mod, nn.MaxPool2d)]
    assert [i for i, _ in pools] == [4, 9, 16, 23]
    assert [p.stride for _, p in pools] == [2, 2, 2, 1]  # pool4 keeps resolution
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in vgg16.modules())
    # heads: 1x1 (512) + 3x3 to k*k score maps; 3x3 (512) + 1x1 to one objectness logit
    s1, _, s2 = vgg16.score_head
    o1, _, o2 = vgg16.objectness_head
    assert (s1.in_channels, s1.out_channels, s1.kernel_size) == (512, 512, (1, 1))
    assert (s2.out_channels, s2.kernel_size) == (25, (3, 3))
    assert (o1.out_channels, o1.kernel_size, o2.out_channels, o2.kernel_size) == (512, (3, 3), 1, (1, 1))
    # the k*k score conv is small (~0.1M parameters, the paper's point against DeepMask's 53M fc)
    assert sum(p.numel() for p in s2.parameters()) == 25 * 512 * 9 + 25


def test_narrow_keeps_topology() -> None:
    model = InstanceFCN(ModelConfig("vgg16_narrow"))
    convs = [mod for mod in model.features if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13
    assert [c.out_channels for c in convs] == [16] * 2 + [32] * 2 + [64] * 3 + [128] * 6
    assert [c.dilation[0] for c in convs] == [1] * 10 + [2] * 3
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in model.features) == 13


def test_load_vgg16_weights_from_file_url(vgg16: InstanceFCN, tmp_path) -> None:
    state = torchvision_vgg16_state_dict()
    torch.save(state, tmp_path / "vgg16.pth")
    heads_before = {k: v.clone() for k, v in vgg16.score_head.state_dict().items()}
    load_vgg16_weights(vgg16, f"file://{tmp_path}/vgg16.pth")
    for key, want in state.items():
        if key.startswith("features."):
            torch.testing.assert_close(vgg16.state_dict()[key], want, rtol=0, atol=0)
    for key, value in vgg16.score_head.state_dict().items():
        torch.testing.assert_close(value, heads_before[key], rtol=0, atol=0)  # heads untouched
    # a checkpoint that wraps the state dict ({"state_dict": ...}) loads too
    wrapped = torchvision_vgg16_state_dict(seed=1)
    torch.save({"state_dict": wrapped}, tmp_path / "wrapped.pth")
    load_vgg16_weights(vgg16, str(tmp_path / "wrapped.pth"))
    torch.testing.assert_close(vgg16.features[28].bias, wrapped["features.28.bias"], rtol=0, atol=0)


def test_load_vgg16_weights_errors(tmp_path) -> None:
    state = torchvision_vgg16_state_dict()
    torch.save(state, tmp_path / "vgg16.pth")
    url = f"file://{tmp_path}/vgg16.pth"
    # same keys (no batch norm), narrow shapes -> the shape error names a tensor and the fix
    plain_narrow = InstanceFCN(ModelConfig("vgg16_narrow", batch_norm=False))
    with pytest.raises(ValueError, match=r"features\.0\.weight has shape \(64, 3, 3, 3\).*--backbone vgg16"):
        load_vgg16_weights(plain_narrow, url)
    # batch-norm narrow model: its keys differ
    with pytest.raises(ValueError, match="missing.*unexpected"):
        load_vgg16_weights(InstanceFCN(ModelConfig("vgg16_narrow")), url)
    # a state dict with a conv missing
    partial = dict(state)
    del partial["features.28.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    model = InstanceFCN(ModelConfig("vgg16_narrow", batch_norm=False))
    with pytest.raises(ValueError, match=r"missing \['features\.28\.weight'\]"):
        load_vgg16_weights(model, str(tmp_path / "partial.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_vgg16_weights(model, str(tmp_path / "list.pth"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_vgg16_weights(model, f"file://{tmp_path}/absent.pth")
