"""Instance-sensitive assembling (Dai et al. 2016, section 3): each window's m x m cells read from
the k x k score maps of their relative position (torch; tests/test_ops.py holds the slow loop
reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Logit for window cells that fall outside the feature map: sigmoid(-1e4) == 0 (background),
# and still finite in bf16/fp16.
BACKGROUND_LOGIT = -1.0e4


def cell_to_map(m: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """(m, m) long: score-map number i*k + j that window cell (r, c) reads, i = r*k // m, j = c*k // m."""
    part = torch.arange(m, device=device) * k // m  # (m,)
    return part[:, None] * k + part[None, :]


def assemble(scores: torch.Tensor, windows: torch.Tensor, m: int) -> torch.Tensor:
    """Instance-sensitive assembling: copies each of a window's k x k cells from its own map.

    scores: (N, k*k, H, W) logits; windows: (n, 3) long (image index, y0, x0), each window's
    top-left feature cell (may be negative or run past the map). Returns (n, m, m) logits;
    cells outside the map read BACKGROUND_LOGIT.
    """
    if scores.ndim != 4:
        raise ValueError(f"assemble: scores must be (N, k*k, H, W), got {tuple(scores.shape)}")
    kk, height, width = scores.shape[1:]
    k = int(round(kk**0.5))
    if k * k != kk:
        raise ValueError(f"assemble: channel count {kk} is not a square k*k")
    windows = windows.long() if windows.device == scores.device else windows.to(device=scores.device, dtype=torch.long)
    windows = windows.reshape(-1, 3)
    if windows.shape[0] == 0:
        return scores.new_zeros((0, m, m))
    # A background border of m cells makes every window one plain gather: a window starting
    # further out than the border is all background, as is the border itself.
    padded = F.pad(scores, (m, m, m, m), value=BACKGROUND_LOGIT)  # (N, k*k, H + 2m, W + 2m)
    offs = torch.arange(m, device=scores.device)
    ys = windows[:, 1:2].clamp(-m, height) + m + offs  # (W, m) rows of `padded`
    xs = windows[:, 2:3].clamp(-m, width) + m + offs  # (W, m)
    b = windows[:, 0][:, None, None]  # (W, 1, 1)
    ch = cell_to_map(m, k, scores.device)[None]  # (1, m, m)
    return padded[b, ch, ys[:, :, None], xs[:, None, :]]  # (W, m, m)
