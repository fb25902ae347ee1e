"""Tight boxes of binarised pasted masks, straight from the windows' m x m grids (torch).

The pasted value of a pixel is the reference's (ops.paste_masks) bilinear blend, along x first and
then y: pixel p of an axis sits at window cell u = clip(((p + 0.5) * factor - stride * c0) / stride
- 0.5, 0, m-1) and blends cells floor(u) and floor(u) + 1 with weight t = u - floor(u). Pixels with
the same floor(u) form a *segment* (at most m per axis, bounds found exactly below); inside one the
value is affine in t and t grows with p, so:

- a row's maximum over x sits at an x-segment's first or last pixel (2m *probes* per axis);
- along y, for one x-probe, the pixels of a segment above the threshold are a prefix or a suffix
  of the segment: its first and last pixels say whether it has any, and a binary search over
  its pixels (a fixed number of steps, log2 of the longest segment) finds where they start or end.

So the first row of the mask is: the first y-segment where some x-probe has an endpoint on, and
there the first pixel on over all probes; likewise the last row, and the columns with y-probes.
Every value is computed with the reference's own float ops at the reference's own pixels, so
float64 gives the reference's boxes exactly (float32 blends with one `lerp` each, a third of the
bytes, within rounding of them); cost O(m^2) per window and a fixed chain of ~150 ops for any
number of windows, images and scales (no host sync).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _resized(p: torch.Tensor, c0: torch.Tensor, f: torch.Tensor, stride: int) -> torch.Tensor:
    """Resized px from the window's start of pixel(s) p (as paste.paste_dense samples it)."""
    return (p.double() + 0.5) * f - (c0 * stride).double()


def cell_coord(p: torch.Tensor, c0: torch.Tensor, f: torch.Tensor, m: int, stride: int) -> torch.Tensor:
    """Window cell u (float64, clamped to [0, m-1]) that pixel(s) p sample: floor(u) and floor(u) + 1
    blend with weight t = u - floor(u) (as paste.paste_dense samples it)."""
    return cell_coord_of(p.double() + 0.5, (c0 * stride).double(), f, m, stride)


def cell_coord_of(centre: torch.Tensor, origin: torch.Tensor, f: torch.Tensor, m: int, stride: int) -> torch.Tensor:
    """cell_coord from the pixel centres p + 0.5 and the windows' resized starts c0 * stride, both
    float64 (exact for integer p, c0): a caller that broadcasts them from per-window values writes
    those full-size once, not as integers converted and shifted there."""
    return ((centre * f - origin) / stride - 0.5).clamp(0.0, m - 1.0)


def _blend(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, exact: bool) -> torch.Tensor:
    """a (1 - t) + b t (broadcast): where exact (float64), the reference's own float ops (three
    outputs); else one `lerp` (a + t (b - a), a third of the bytes), within rounding of them."""
    return a * (1.0 - t) + b * t if exact else torch.lerp(a, b, t)


def _weight(p: torch.Tensor, c0: torch.Tensor, f: torch.Tensor, m: int, stride: int) -> torch.Tensor:
    u = cell_coord(p, c0, f, m, stride)
    return u - u.floor()


def segments(c0: torch.Tensor, f: torch.Tensor, size: torch.Tensor, m: int, stride: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window and segment j (cells j, j + 1 blended): its valid pixels [lo, hi) along one axis.

    c0, f, size: (...,) window start cell, factor (float64), image side -> lo, hi: (..., m) long,
    hi == lo for an empty segment. Bounds are first pixels where a monotone float predicate turns
    true (span start, u >= j, span end), estimated in closed form and settled by evaluating the
    predicate itself at the estimate and the pixel before it (neither: the one after it)."""
    dev = c0.device
    j = torch.arange(m + 1, device=dev, dtype=torch.float64)
    # resized-px thresholds: span start 0, cell boundaries (j + 0.5) * stride, span end m * stride
    theta = torch.where(j == 0, 0.0, torch.where(j == m, float(m * stride), (j + 0.5) * stride))  # (m + 1,)
    c0e, fe = c0[..., None], f[..., None]
    est = torch.ceil((theta + (c0e * stride).double()) / fe - 0.5).long()  # (..., m + 1)
    cand = est[..., None] + torch.arange(-1, 1, device=dev)  # (..., m + 1, 2): est - 1, est (else est + 1)
    r = _resized(cand, c0e[..., None], fe[..., None], stride)
    jj = j.long()[:, None]
    inner = (r / stride - 0.5) >= jj  # u >= j <=> floor(clip(u)) >= j for 1 <= j <= m - 1
    ok = torch.where(jj == 0, r >= 0, torch.where(jj == m, r >= m * stride, inner))  # (..., m + 1, 2)
    first = torch.where(ok[..., 0], cand[..., 0], torch.where(ok[..., 1], cand[..., 1], est + 1))
    vlo = first[..., :1].clamp(min=0)
    vhi = torch.minimum(first[..., m:], size[..., None])
    lo = torch.maximum(first[..., :m], vlo)
    hi = torch.maximum(torch.minimum(first[..., 1:], vhi), lo)
    return lo, hi


def search_steps(min_factor: float, stride: int) -> int:
    """Binary-search steps that settle any segment of an axis whose factor is >= min_factor."""
    longest = math.ceil(1.5 * stride / min_factor) + 2  # segment 0 also holds the clamped u < 0
    return max(1, math.ceil(math.log2(longest)))


def tight_boxes(probs: torch.Tensor, cells: torch.Tensor, factor: torch.Tensor, sizes: torch.Tensor, m: int,
                stride: int, threshold: float, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 4) long tight boxes (x0, y0, x1, y1), ends exclusive, of the binarised pasted masks; zeros
    when empty.

    probs: (n, m, m) window probabilities; cells: (n, 2) long top-left cell (y0, x0); factor: (n, 2)
    float64 (fy, fx); sizes: (n, 2) long image (height, width) of each window; steps: from
    `search_steps` of the smallest factor. Values blend in `dtype` (float64: the reference's float ops;
    else one `lerp` a blend, within rounding of them: _blend)."""
    n = probs.shape[0]
    dev = probs.device
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.long, device=dev)
    p = probs.to(dtype)
    exact = dtype == torch.float64
    c0, f, size = cells.long().T, factor.double().T, sizes.long().T  # (2, n): axis 0 = y, 1 = x
    lo, hi = segments(c0, f, size, m, stride)  # (2, n, m)
    ext = torch.arange(m + 1, device=dev).clamp(max=m - 1)  # (m + 1,) cells 0..m-1, the last once more
    # P with its last cell row and column repeated: cells j and j1 = min(j + 1, m - 1) of every j are
    # then the views [:m] and [1:], never gathered copies
    pe = p[:, ext[:, None], ext]  # (n, m + 1 rows, m + 1 cells)
    # probes: each segment's first and last pixel, (2, n, 2m); cells j, j1 and weight t there
    probe = torch.cat([lo, hi - 1], -1)
    probe_ok = torch.cat([hi > lo] * 2, -1)
    pt = _weight(probe, c0[..., None], f[..., None], m, stride).to(dtype)  # (2, n, 2m)
    # Rows (y-segments, x-probes): x-blend at the probes, Q[r, k] = P[r, j_k] (1 - t_k) + P[r, j1_k] t_k
    # (probes k and k + m share cells j_k, j1_k: the products broadcast P over the two ends, no copies)
    tx = pt[1].reshape(n, 1, 2, m)
    qe = _blend(pe[:, :, None, :m], pe[:, :, None, 1:], tx, exact).reshape(n, m + 1, 2 * m)  # (n, m + 1, 2m)
    q, q1 = qe[:, :m], qe[:, 1:]  # Q at rows j and j1
    # Every segment end of one axis against every probe of the other is one grid of pixels: (y probe, x
    # probe), both ends of both axes' segments. Its values are the reference's float ops (Q blended along
    # y at the y probe's weight), computed once: (n, m y-segments, 2m x-probes) at the segments' first
    # pixels (y probes 0..m-1) and at their last (m..2m-1).
    t_lo, t_hi = pt[0][:, :m, None], pt[0][:, m:, None]  # (n, m, 1) y weights at each y-segment's ends
    g_lo = _blend(q, q1, t_lo, exact) > threshold
    g_hi = _blend(q, q1, t_hi, exact) > threshold

    x_ok, y_ok = probe_ok[1][:, None, :], probe_ok[0][:, :, None]  # (n, 1, 2m), (n, 2m, 1): the probe exists

    def cols(at: slice) -> torch.Tensor:
        """(n, m): some existing y-probe is on at the x-segments' first (:m) or last (m:) pixels."""
        return (g_lo[..., at] & y_ok[:, :m]).any(1) | (g_hi[..., at] & y_ok[:, m:]).any(1)

    exists = hi > lo  # (2, n, m) the segment has pixels
    on_lo = exists & torch.stack([(g_lo & x_ok).any(-1), cols(slice(None, m))])  # (2, n, m): on at its first pixel
    on_hi = exists & torch.stack([(g_hi & x_ok).any(-1), cols(slice(m, None))])  # at its last pixel
    seg_on = on_lo | on_hi  # (2, n, m)
    found = seg_on.any(-1)  # (2, n)
    first = seg_on.to(torch.int8).argmax(-1)  # first segment with a pixel on
    last = m - 1 - seg_on.flip(-1).to(torch.int8).argmax(-1)
    # Both ends at once: side 0 looks in the first such segment for its first pixel on, side 1 in the
    # last for its last pixel on, i.e. the pixel before its first pixel off after an on one.
    at = torch.stack([first, last])[..., None]  # (2 sides, 2 axes, n, 1)

    def pick(t: torch.Tensor) -> torch.Tensor:  # (2, n, m, ...) -> (2 sides, 2, n, ...) at each side's segment
        idx = at.reshape(*at.shape, *([1] * (t.dim() - 3))).expand(2, *t.shape[:2], 1, *t.shape[3:])
        return t.expand(2, *t.shape).gather(3, idx).squeeze(3)

    s_lo, s_hi = pick(lo), pick(hi)  # (2, 2, n)
    # the searched segment's blend terms per side, axis and probe (2 sides, 2 axes, n, 2m): rows Q at
    # segments a, a + 1 (s = 0); columns P at the probe's rows i0, i1 and cells a, a + 1, s its y weight
    ar = torch.arange(n, device=dev)
    a_r, a_c = at[:, 0, :, 0], at[:, 1, :, 0]  # (2 sides, n)
    pt_ = pe.transpose(1, 2)  # (n, m + 1, m + 1): [cell, row], the last of each repeated

    # rows: Q at segments a, a + 1 blended along y (its x blend is in Q); columns: P at cells a, a + 1 of
    # every cell row, blended along x, then at the probe's rows i0, i1 along y with the probe's s
    xr0, xr1 = qe[ar, a_r], qe[ar, a_r + 1]  # (2 sides, n, 2m)
    pa, pa1 = pt_[ar, a_c], pt_[ar, a_c + 1]  # (2 sides, n, m + 1 rows)
    s = pt[0].reshape(n, 2, m)  # (n, 2, m) each y probe's weight (first pixels, then last)
    # One search per side, axis and window over "some probe is on" (not one per probe): in a segment
    # each probe's pixels on are a prefix or a suffix, so where no probe is on at the segment's
    # first pixel they are all suffixes (side 0: their union is a suffix), and where none is on at
    # its last all prefixes (side 1: the pixels where none is on are a suffix). The geometry (float64)
    # is then computed per side, axis and window, not per probe.
    valid = probe_ok.flip(0)[None]  # (1, 2, n, 2m): the probe exists (a searched segment does)
    any_lo, any_hi = pick(on_lo), pick(on_hi)  # (2 sides, 2, n): some probe is on at the segment's first (last) pixel
    side = torch.arange(2, device=dev).bool()[:, None, None]  # [False, True], made on the device
    # search for the first pixel in (lo, hi - 1] where `some on != side`, given it holds at hi - 1, not at lo
    below, above = s_lo.clone(), s_hi - 1
    ce, fe = c0[None], f[None]
    for _ in range(steps):
        mid = (below + above) // 2
        t = _weight(mid, ce, fe, m, stride).to(dtype)[..., None]  # (2 sides, 2 axes, n, 1)
        tr, tc = t[:, 0], t[:, 1]
        rows = _blend(xr0, xr1, tr, exact)  # (2 sides, n, 2m)
        qc = _blend(pa, pa1, tc, exact)[..., None, :]  # (2 sides, n, 1, m + 1 rows): along x at the pixel
        cols = _blend(qc[..., :m], qc[..., 1:], s, exact).reshape(2, n, 2 * m)  # then along y at each probe
        on_mid = (torch.stack([rows > threshold, cols > threshold], 1) & valid).any(-1)
        flip = on_mid != side
        above, below = torch.where(flip, mid, above), torch.where(flip, below, mid)
    # side 0: lo if some probe is on there, else the search's answer; side 1: hi - 1 likewise, else answer - 1
    hit0 = torch.where(any_lo[0], s_lo[0], above[0])
    hit1 = torch.where(any_hi[1], s_hi[1] - 1, above[1] - 1)
    live = found.all(0)  # (n,): both axes see the same pixels, so one empty means both
    start = torch.where(live, hit0, 0)  # (2, n): (y0, x0)
    end = torch.where(live, hit1 + 1, 0)
    return torch.stack([start[1], start[0], end[1], end[0]], 1)


def crop_bbox(top: int, left: int, crop: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight COCO box (x, y, w, h) of a pasted crop, or None when it is empty."""
    rows = np.flatnonzero(crop.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(crop.any(axis=0))
    return (float(left + cols[0]), float(top + rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))
