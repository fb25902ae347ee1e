"""Pasting window probabilities back into image pixels and binarising them, side by side:

    paste_masks        the numpy reference, window by window (ops' maths, bit for bit in float64)
    paste_dense        torch: windows over their tight boxes, dense in blocks of similar box sizes

Pixel p of an axis sits at window cell u = clip(((p + 0.5) * factor - stride * c0) / stride - 0.5,
0, m-1) and blends cells floor(u) and floor(u) + 1 with weight t = u - floor(u); pixels whose centre
falls outside the window's span [stride * c0, stride * (c0 + m)) or outside the image are 0. A
window's pasted value is that blend along x first, then along y; > threshold is the mask.
Geometry is float64 everywhere; torch blends in `dtype` (float64 reproduces the reference), in
float64 where float32 products would run in a reduced mode (TF32): never below float32.
"""
from __future__ import annotations

import numpy as np
import torch

from .boxes import cell_coord_of


# --------------------------------------------------------------------------- numpy reference

class _AxisSamples:
    """Bilinear sampling of one axis for a batch of windows: each pixel of a window's span blends
    cells i0 and i1 with weight t on i1. All fields (W, count); `valid` marks pixels inside both
    the window's span and the image.

    Pixel p (centre p + 0.5) sits at resized coordinate (p + 0.5) * factor, i.e. at window cell
    u = ((p + 0.5) * factor - stride * c0) / stride - 0.5, clamped to [0, m-1].
    """

    def __init__(self, cell0: np.ndarray, factor: float, m: int, stride: int, size: int) -> None:
        self.start, count = window_pixel_span(cell0, factor, m, stride)
        p = self.start[:, None] + np.arange(count)[None, :]  # (W, count) image pixels
        r = (p + 0.5) * factor - (cell0 * stride)[:, None]  # resized px from the window's start
        self.valid = (r >= 0) & (r < m * stride) & (p >= 0) & (p < size)
        u = np.clip(r / stride - 0.5, 0.0, m - 1.0)
        self.i0 = np.floor(u).astype(np.int64)
        self.i1 = np.minimum(self.i0 + 1, m - 1)
        self.t = u - self.i0

    def support(self, on: np.ndarray) -> np.ndarray:
        """(W, count) pixels that blend at least one cell marked in `on` (W, m)."""
        rows = np.arange(len(on))[:, None]
        return self.valid & (on[rows, self.i0] | on[rows, self.i1])


def window_pixel_span(cell0: np.ndarray, factor: float, m: int, stride: int) -> tuple[np.ndarray, int]:
    """First image pixel a window covers along one axis, and a span length that fits every window.

    A window starting at feature cell c0 covers resized pixels [c0*stride, (c0+m)*stride), i.e.
    image pixels p with c0*stride <= (p + 0.5) * factor < (c0+m)*stride.
    """
    start = np.ceil(cell0 * stride / factor - 0.5).astype(np.int64)
    count = int(np.ceil(m * stride / factor)) + 1
    return start, count


_EMPTY_CROP = (0, 0, np.zeros((0, 0), dtype=bool))


def paste_masks(probs: np.ndarray, cells: np.ndarray, factor: tuple[float, float], image_size: tuple[int, int],
                stride: int = 8, threshold: float = 0.5) -> list[tuple[int, int, np.ndarray]]:
    """Pastes m x m window probabilities back into image pixels and binarises them.

    probs: (W, m, m) in [0, 1]; cells: (W, 2) window top-left feature cells (y0, x0) at a scale
    whose resized/original factor is (fy, fx); image_size: (H, W) of the original image.
    Returns per window (top, left, crop): crop is the mask's tight bool (h, w) box inside the image,
    (0, 0, (0, 0)) when the mask is empty. Pixel p samples the window bilinearly at cell
    u = ((p + 0.5) * factor - stride * c0) / stride - 0.5 (clamped to [0, m-1]) and is zero outside
    the window's span [stride * c0, stride * (c0 + m)) in resized pixels.
    """
    n, m, _ = probs.shape
    height, width = image_size
    if n == 0:
        return []
    probs = np.asarray(probs, dtype=np.float64)  # float64: bit-identical to the per-pixel formula
    # Bilinear weights are convex, so a pixel can pass the threshold only where one of the cells
    # it blends does (up to rounding, hence the margin): only those rows/columns are resampled,
    # and masks are sparse in their windows.
    on = probs > threshold - 1e-9  # (W, m, m)
    ay = _AxisSamples(cells[:, 0].astype(np.int64), factor[0], m, stride, height)
    ax = _AxisSamples(cells[:, 1].astype(np.int64), factor[1], m, stride, width)
    ys_live, xs_live = ay.support(on.any(axis=2)), ax.support(on.any(axis=1))  # (W, Sy), (W, Sx)
    y_first, y_end = _first_and_end(ys_live)  # (W,) live pixel range [first, end) per window
    x_first, x_end = _first_and_end(xs_live)
    out: list[tuple[int, int, np.ndarray]] = []
    for w in range(n):
        a, b, c, d = y_first[w], y_end[w], x_first[w], x_end[w]
        if a >= b or c >= d:
            out.append(_EMPTY_CROP)
            continue
        tx, ty = ax.t[w, c:d], ay.t[w, a:b, None]
        p = probs[w]
        q = p[:, ax.i0[w, c:d]] * (1.0 - tx) + p[:, ax.i1[w, c:d]] * tx  # (m, wx): along x first
        v = q[ay.i0[w, a:b]] * (1.0 - ty) + q[ay.i1[w, a:b]] * ty  # (hy, wx)
        binary = v > threshold
        rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
        if rows.size == 0:
            out.append(_EMPTY_CROP)
            continue
        top, left = int(ay.start[w] + a + rows[0]), int(ax.start[w] + c + cols[0])
        out.append((top, left, binary[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    return out


def _first_and_end(live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """live: (W, S) bool -> per row the first True index and one past the last (0, 0 when none)."""
    any_ = live.any(axis=1)
    first = np.argmax(live, axis=1)
    end = live.shape[1] - np.argmax(live[:, ::-1], axis=1)
    return np.where(any_, first, 0), np.where(any_, end, 0)


# --------------------------------------------------------------------------- torch

def dense_weights(boxes: torch.Tensor, cells: torch.Tensor, factor: torch.Tensor, shape: tuple[int, int], m: int,
                  stride: int, dtype: torch.dtype, split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear weights of both axes as matrices, in one pass of ops over both: x (n, S, W, m) for box
    columns 0..W-1, y (n, S, H + 2, m) for box rows -1..H (zero rows at -1, at H and past each
    box's side). split (S = 2): [:, 0] holds 1 - t at cell i0 and [:, 1] t at cell i1, so a matrix
    product with either is the reference's product exactly (one nonzero term per output: x * 0 is 0
    for finite x); else (S = 1) both in one matrix, a product blending in one step."""
    dev = boxes.device
    wp, hp = shape
    n = len(boxes)
    ar = torch.arange(wp + hp + 2, device=dev)  # (L,): x columns, then y rows from -1
    is_x = ar < wp
    rel = torch.where(is_x, ar, ar - (wp + 1))
    pick = lambda t: torch.where(is_x, t[:, 1:2], t[:, 0:1])  # noqa: E731 (n, 2) (y, x) -> (n, L)
    centre = pick(boxes[:, [1, 0]].double() + 0.5) + rel  # (n, L) float64 pixel centres (exact)
    side = pick(torch.stack([boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1))
    u = cell_coord_of(centre, pick((cells * stride).double()), pick(factor), m, stride)  # (n, L) float64
    i0 = u.floor()
    t = (u - i0).to(dtype)
    i0 = i0.long()
    inside = (rel >= 0) & (rel < side)  # (n, L)
    index = torch.stack([i0, (i0 + 1).clamp(max=m - 1)], -1)  # (n, L, 2)
    weight = torch.where(inside[..., None], torch.stack([1.0 - t, t], -1), 0)  # (n, L, 2)
    if split:
        out = torch.zeros((n, 2, len(ar), m), dtype=dtype, device=dev)
        out.scatter_(3, index.transpose(1, 2)[..., None], weight.transpose(1, 2)[..., None])
    else:  # i0 == i1 (clamped): t is 0
        out = torch.zeros((n, 1, len(ar), m), dtype=dtype, device=dev)
        out[:, 0].scatter_add_(2, index, weight)
    return out[:, :, :wp], out[:, :, wp:]


def full_float32_products(device: torch.device) -> bool:
    """Whether float32 matrix products on `device` run in full float32 now: not in TF32 (CUDA's
    `allow_tf32`, off by default) nor in oneDNN's reduced modes on CPU. Read per call, never set: the
    switches are process-wide, and the forward or the caller may want them on."""
    if device.type == "cuda":
        return not torch.backends.cuda.matmul.allow_tf32
    precision = getattr(getattr(getattr(torch.backends, "mkldnn", None), "matmul", None), "fp32_precision", "none")
    if precision == "none":  # follows the generic setting (torch >= 2.9), or the legacy one before it
        precision = getattr(torch.backends, "fp32_precision", "none")
        if precision == "none":
            return torch.get_float32_matmul_precision() == "highest"
    return precision == "ieee"


def paste_dense(probs: torch.Tensor, cells: torch.Tensor, factor: torch.Tensor, boxes: torch.Tensor,
                shape: tuple[int, int], m: int, stride: int, threshold: float, dtype: torch.dtype = torch.float32,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Binarised pasted masks of windows over their boxes, dense and column-major, for windows of
    similar box sizes: (n, W, H + 2) bool, box pixel (x, y) of window i at [i, x, y + 1]; row 0, row
    H + 1 and everything past a box's own width and height False (a zero row above and below every
    column: a run event is a pixel unlike the one before it); out: where to write it, e.g. a view
    of a flat buffer.

    probs: (n, m, m); cells: (n, 2) long; factor: (n, 2) float64; boxes: (n, 4) long (x0, y0, x1, y1)
    inside their images; shape: (W, H) host ints >= every box's width and height. A pass (x first,
    then y) is batched matrix products with the bilinear weights (dense_weights). float64: the
    reference's float ops exactly, two products a pass (one nonzero term each) and their sum: ~21
    bytes written a padded pixel. Otherwise one product a pass, each output the sum of two terms
    rounded once (a fused multiply-add may round the pair once where the reference rounds thrice:
    pixels within rounding of the threshold may differ, as float32 ones may anyway): ~6 bytes a
    padded pixel in float32 (the product and the bool), where a flat paste with per-pixel indices
    wrote ~80. Products are never rounded below float32: where float32 products would run in a
    reduced mode (TF32 on CUDA, which rounds inputs to 10 bits and would move pasted values by
    ~1e-3; `full_float32_products`), they run in float64 instead (~9 bytes a padded pixel), with no
    process-wide switch set or restored."""
    n = len(boxes)
    wp, hp = shape
    exact = dtype == torch.float64
    if not exact and not full_float32_products(probs.device):
        dtype = torch.float64  # one product a pass, as below: float64 has no reduced mode
    p = probs.to(dtype)
    wx, wy = dense_weights(boxes, cells, factor, shape, m, stride, dtype, split=exact)  # (n, S, W | H + 2, m)
    if not exact:
        q = torch.bmm(wx[:, 0], p.transpose(1, 2))  # (n, W, m rows): along x first
        return torch.gt(torch.bmm(q, wy[:, 0].transpose(1, 2)), threshold, out=out)  # then along y
    qq = torch.bmm(wx.reshape(n, 2 * wp, m), p.transpose(1, 2))  # (n, 2W, m rows): along x first
    q = qq[:, :wp] + qq[:, wp:]  # (n, W, m)
    vv = torch.bmm(q, wy.reshape(n, 2 * (hp + 2), m).transpose(1, 2))  # (n, W, 2 (H + 2)): then along y
    return torch.gt(vv[..., :hp + 2] + vv[..., hp + 2:], threshold, out=out)
