"""COCO compressed RLE strings from uncompressed run lengths, with numpy: many masks in one pass.

pycocotools' `rleToString` (maskApi.c) writes each run length x (from the fourth on, as the
difference x - runs[i-2]) as 5-bit groups, least significant first, each group + 48 as one
character, with 0x20 set on every group but the last; it stops once the rest of x is 0 (or -1 for
a negative x whose last group has its sign bit 0x10 set). This module does the same arithmetic on
every run of every mask at once, so a thousand masks cost a few numpy calls instead of a thousand
pycocotools calls and dicts; `tests/test_rle.py` checks it against pycocotools byte for byte.
No torch: the encoding stage's workers import it.
"""
from __future__ import annotations

import numpy as np

GROUP_BITS = 5
# A difference of two uint32 runs fits in 34 signed bits: at most 7 groups of 5 bits.
MAX_GROUPS = 7


def compress(counts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks' run lengths back to back -> their COCO compressed RLE strings back to back.

    counts: (R,) uint32 every mask's column-major runs, background first; lengths: (P,) runs per
    mask. Returns (offsets (P + 1,) int64, chars (offsets[-1],) uint8 ASCII): mask i's string is
    chars[offsets[i]:offsets[i + 1]] (the layout of an Arrow string array).
    """
    counts = np.asarray(counts, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if lengths.sum() != len(counts):
        raise ValueError(f"run lengths: {len(counts)} counts but lengths sum to {int(lengths.sum())}; "
                         f"lengths[i] must be the number of runs of mask i")
    starts = np.cumsum(lengths) - lengths  # (P,) first run of each mask
    index = np.arange(len(counts)) - np.repeat(starts, lengths)  # (R,) run's index within its mask
    x = counts.copy()
    diffed = index > 2  # maskApi.c: `if (i > 2) x -= cnts[i - 2]`
    x[diffed] -= counts[np.flatnonzero(diffed) - 2]
    shifts = np.arange(MAX_GROUPS, dtype=np.int64) * GROUP_BITS
    groups = (x[:, None] >> shifts) & 0x1F  # (R, G) 5-bit groups, least significant first
    rest = x[:, None] >> (shifts + GROUP_BITS)  # (R, G) what is left after each group (arithmetic shift)
    done = np.where(groups & 0x10, rest == -1, rest == 0)  # (R, G) the run ends with this group
    n = np.argmax(done, axis=1) + 1  # (R,) groups written per run (the first that ends it)
    used = np.arange(MAX_GROUPS) < n[:, None]  # (R, G)
    more = np.arange(MAX_GROUPS) < (n - 1)[:, None]
    chars = (groups | (more * 0x20)) + 48
    before = np.zeros(len(counts) + 1, np.int64)  # (R + 1,) characters before each run
    np.cumsum(n, out=before[1:])
    offsets = np.concatenate(([0], before[starts + lengths]))  # (P + 1,)
    return offsets, chars[used].astype(np.uint8)


def compress_one(runs: np.ndarray) -> str:
    """One mask's run lengths -> its COCO compressed RLE string (what pycocotools' frPyObjects gives)."""
    offsets, chars = compress(runs, np.array([len(runs)]))
    return chars.tobytes().decode("ascii")
