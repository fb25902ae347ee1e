"""DeepMask's heads (Pinheiro, Collobert, Dollár, NIPS 2015, "Learning to Segment Object Candidates")
on InstanceFCN's trunk: the paper's main comparison, at the same windows, sampling, loss and predictor.

    images (N, 3, H, W)                 -> masks (N, m*m, h, w), objectness (N, 1, h, w)   (dense: inference)
    images (N, 3, H, W), windows (S, 3) -> masks (S, m, m), objectness (S,)               (sampled: training)

DeepMask reads a fixed window of trunk features (14 x 14 x 512 at stride 16 in the paper) with
  mask:  1x1 conv to 512 + ReLU, a fully connected layer to 512 without a non-linearity (a low-rank
         factorisation), a fully connected layer to the mask grid (56 x 56);
  score: 2x2 max pool, fully connected 512 + ReLU, 1024 + ReLU, 1 objectness logit.
Here the window is InstanceFCN's m x m feature cells (21 x 21 at stride 8, 168 px) and the mask grid
is m x m, the grid InstanceFCN assembles, so the shared Predictor and the training targets need
nothing else. A fully connected layer over a fixed window is a conv whose kernel is the window, so
both heads run as convs over every window centre at stride 8, like InstanceFCN's; features outside
the image are zero for a window, as a conv's zero padding makes them. Deviations: no dropout; the
1x1 conv narrows to a quarter of the trunk's width (the window has 2.25x DeepMask's cells), which
keeps the heads at ~3.5M parameters on vgg16_narrow (~56M on vgg16, near DeepMask's ~53M).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ifcn.config import ModelConfig
from ifcn.ops.assembling import BACKGROUND_LOGIT

from .instancefcn import InstanceFCN, _vgg16_trunk, init_weights


@dataclass(frozen=True)
class DeepMaskHeads:
    """Head widths, derived from the trunk's last width w (512 on vgg16, 128 on vgg16_narrow)."""

    mask_channels: int  # 1x1 conv before the window FC (w / 4)
    rank: int  # the low-rank FC's width (DeepMask: 512 = w)
    score_hidden: tuple[int, int]  # the score FCs (DeepMask: 512, 1024 = w, 2w)

    @classmethod
    def for_config(cls, config: ModelConfig) -> "DeepMaskHeads":
        w = config.head_width
        return cls(max(1, w // 4), w, (w, 2 * w))


def crop_windows(features: torch.Tensor, windows: torch.Tensor, size: int, step: int = 1) -> torch.Tensor:
    """features (N, C, H, W), windows (S, 3) long (image, y0, x0) -> (S, C, size, size): the cells
    (y0 + step*i, x0 + step*j), zero where they fall off the map. One gather, no loop over windows."""
    height, width = features.shape[-2:]
    windows = windows.to(device=features.device, dtype=torch.long).reshape(-1, 3)
    span = step * (size - 1) + 1
    padded = F.pad(features, (span, span, span, span))  # a window further out than `span` is all zeros
    offs = torch.arange(size, device=features.device) * step
    ys = windows[:, 1:2].clamp(-span, height) + span + offs  # (S, size) rows of `padded`
    xs = windows[:, 2:3].clamp(-span, width) + span + offs  # (S, size)
    b = windows[:, 0][:, None, None]  # (S, 1, 1)
    return padded[b, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)  # (S, size, size, C) -> (S, C, ..)


class DeepMask(nn.Module):
    """VGG-16 trunk (stride 8, as InstanceFCN's) + DeepMask's mask and score heads over m x m windows.

    Parameters: `features` (the trunk), `mask_reduce`, `mask_fc`, `mask_out` (mask branch),
    `score_fc1`, `score_fc2`, `score_out` (score branch). The window FCs are stored as convs
    (kernel = the window), so the dense form is a plain conv and the per-window form a linear.
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        if config.m < 2:
            raise ValueError(f"DeepMask: needs windows of m >= 2 cells (the score branch pools 2x2), got m={config.m}")
        self.config = config
        self.heads = heads = DeepMaskHeads.for_config(config)
        c, m = config.widths[-1], config.m
        self.features = _vgg16_trunk(config.widths, config.use_batch_norm)
        self.mask_reduce = nn.Conv2d(c, heads.mask_channels, 1)
        self.mask_fc = nn.Conv2d(heads.mask_channels, heads.rank, m)  # FC over the m x m window, linear
        self.mask_out = nn.Conv2d(heads.rank, m * m, 1)  # FC to the m x m mask grid
        # 2x2 max pool (stride 2, floor: DeepMask's 14 -> 7) leaves m // 2 cells a side; densely that
        # is a stride-1 pool and a conv dilated by 2.
        self.score_fc1 = nn.Conv2d(c, heads.score_hidden[0], m // 2, dilation=2)
        self.score_fc2 = nn.Conv2d(heads.score_hidden[0], heads.score_hidden[1], 1)
        self.score_out = nn.Conv2d(heads.score_hidden[1], 1, 1)
        init_weights(self, (self.mask_out, self.score_out))

    load_backbone_state_dict = InstanceFCN.load_backbone_state_dict  # same trunk, same ImageNet layout

    def forward(self, images: torch.Tensor, windows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) normalised; windows (S, 3) long (image, y0, x0) or None.

        None: every window centre -> (masks (N, m*m, h, w), objectness (N, 1, h, w)), h = ceil(H/8);
        channel r*m + c of a centre's mask is cell (r, c) of the window centred there.
        Windows: only those -> (masks (S, m, m), objectness (S,)), the same numbers (training)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DeepMask.forward: expected images (N, 3, H, W), got {tuple(images.shape)}")
        feats = self.features(images)  # (N, C, h, w)
        reduced = F.relu(self.mask_reduce(feats))  # (N, c, h, w)
        if windows is None:
            return self._dense_masks(reduced), self._dense_objectness(feats)
        m = self.config.m
        windows = windows.to(feats.device, torch.long).reshape(-1, 3)
        crops = crop_windows(reduced, windows, m).flatten(1)  # (S, c*m*m)
        low = F.linear(crops, self.mask_fc.weight.flatten(1), self.mask_fc.bias)  # (S, rank)
        masks = F.linear(low, self.mask_out.weight.flatten(1), self.mask_out.bias).reshape(-1, m, m)
        # The windows' 2x2 pools, read from one stride-1 pool of the map (4x less to gather than
        # pooling every crop): pool[t] = max(f[t - 1], f[t]), so a window's pool cell i is pool[y0 + 2i + 1].
        pool = F.max_pool2d(F.pad(feats, (1, 1, 1, 1)), 2, stride=1)  # (N, C, h + 1, w + 1)
        shifted = windows + torch.tensor([0, 1, 1], device=feats.device)
        pooled = crop_windows(pool, shifted, m // 2, step=2).flatten(1)  # (S, C * (m//2)^2)
        hidden = F.relu(F.linear(pooled, self.score_fc1.weight.flatten(1), self.score_fc1.bias))
        hidden = F.relu(F.linear(hidden, self.score_fc2.weight.flatten(1), self.score_fc2.bias))
        return masks, F.linear(hidden, self.score_out.weight.flatten(1), self.score_out.bias)[:, 0]

    def _dense_masks(self, reduced: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w) -> (N, m*m, h, w): the window centred at (y, x) starts at (y - m//2, x - m//2)."""
        m, lo = self.config.m, self.config.m // 2
        padded = F.pad(reduced, (lo, m - 1 - lo, lo, m - 1 - lo))  # (N, c, h + m - 1, w + m - 1)
        return self.mask_out(self.mask_fc(padded))

    def _dense_objectness(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, 1, h, w): pool cell i of a window reads cells 2i, 2i+1 from its top-left."""
        lo, (h, w) = self.config.m // 2, feats.shape[-2:]
        padded = F.pad(feats, (lo, lo, lo, lo))  # zeros: outside the map, as a cropped window sees it
        pooled = F.max_pool2d(padded, 2, stride=1)  # (N, C, h + 2lo - 1, w + 2lo - 1)
        hidden = F.relu(self.score_fc1(pooled))  # (N, s1, h + 1, w + 1): reads pooled[y + 2i], i < m // 2
        hidden = F.relu(self.score_fc2(hidden[..., :h, :w]))
        return self.score_out(hidden)

    def window_logits(self, masks: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Dense masks (N, m*m, h, w) and windows (n, 3) long (image, y0, x0) -> (n, m, m) mask
        logits (what the Predictor pastes); a window whose centre is off the map is background."""
        m, half = self.config.m, self.config.m // 2
        windows = windows.to(device=masks.device, dtype=torch.long).reshape(-1, 3)
        cy, cx = windows[:, 1] + half, windows[:, 2] + half
        on = (cy >= 0) & (cy < masks.shape[2]) & (cx >= 0) & (cx < masks.shape[3])
        picked = masks[windows[:, 0], :, cy.clamp(0, masks.shape[2] - 1), cx.clamp(0, masks.shape[3] - 1)]  # (n, m*m)
        return torch.where(on[:, None], picked, torch.full_like(picked, BACKGROUND_LOGIT)).reshape(-1, m, m)
