"""What leaves the inference actor and what the encoding stage makes of it: Arrow columns, built
from numpy, with no Python object per proposal.

    proposals_column(per image: Proposals | None)   actor side: HANDOFF_TYPE, one list per image
    encode_column(HANDOFF_TYPE column)              encoding side: the table's `proposals` column
                                                    (schema.PROPOSAL_TYPE lists), RLE strings by ifcn.ops.rle

Why columns rather than npz bytes per image: the object store moves Arrow buffers without
(de)serialising them, and the encoder works on every proposal of a batch in a few numpy calls
(ranks, boxes, offsets), and the strings come from one pycocotools call per image.
No torch: the encoding workers import this module (tests/test_stage_imports.py).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pycocotools import mask as mask_utils

from pipeline.tables.schema import PROPOSAL_TYPE

# One image's proposals, best first: per proposal its score, tight box (x, y, w, h), area, scale and
# COCO uncompressed run lengths (column-major, background first).
HANDOFF_PROPOSAL = pa.struct([("score", pa.float32()), ("box", pa.list_(pa.float32(), 4)), ("area", pa.int64()),
                              ("scale", pa.int32()), ("runs", pa.large_list(pa.uint32()))])
HANDOFF_TYPE = pa.list_(HANDOFF_PROPOSAL)


def proposals_column(images: Sequence[Any | None]) -> pa.Array:
    """Per image its `ifcn.Proposals` (None for an image without results: an empty list) -> one
    HANDOFF_TYPE array; numpy concatenations, the runs' buffers copied once."""
    kept = [p for p in images if p is not None and len(p.scores)]
    per_image = np.array([len(p.scores) if p is not None else 0 for p in images], np.int64)  # (B,)

    def cat(name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        parts = [np.asarray(getattr(p, name), dtype).reshape(-1, *shape) for p in kept]
        if len(parts) == 1:  # one image's arrays as they are (Arrow wraps them without a copy)
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)

    lengths = cat("lengths", np.int64)  # (P,)
    runs = pa.LargeListArray.from_arrays(_offsets(lengths), pa.array(cat("counts", np.uint32), pa.uint32()))
    boxes = pa.FixedSizeListArray.from_arrays(pa.array(cat("boxes", np.float32, (4,)).reshape(-1), pa.float32()), 4)
    struct = pa.StructArray.from_arrays(
        [pa.array(cat("scores", np.float32)), boxes, pa.array(cat("areas", np.int64)),
         pa.array(cat("scales", np.int32)), runs], fields=list(HANDOFF_PROPOSAL))
    return pa.ListArray.from_arrays(pa.array(_offsets(per_image).astype(np.int32)), struct)


def proposals_chunks(images: Sequence[Any | None]) -> pa.ChunkedArray:
    """`proposals_column` with one chunk per image: no image's runs are copied to make the column
    (the object store copies them once more anyway; the encoding stage works chunk by chunk)."""
    return pa.chunked_array([proposals_column([p]) for p in images], HANDOFF_TYPE)


def proposals_at(column: pa.Array, i: int) -> dict[str, np.ndarray]:
    """Image i's proposals as numpy (tests, benchmarks): scores, boxes (P, 4), areas, scales, counts, lengths."""
    flat = pc.list_flatten(column[i:i + 1])
    fields = dict(zip(HANDOFF_PROPOSAL.names, flat.flatten()))
    return {"scores": fields["score"].to_numpy(), "areas": fields["area"].to_numpy(),
            "boxes": pc.list_flatten(fields["box"]).to_numpy().reshape(-1, 4), "scales": fields["scale"].to_numpy(),
            "counts": pc.list_flatten(fields["runs"]).to_numpy(),
            "lengths": pc.list_value_length(fields["runs"]).to_numpy().astype(np.int32)}


def encode_column(column: pa.Array | pa.ChunkedArray, heights: np.ndarray, widths: np.ndarray) -> pa.Array | pa.ChunkedArray:
    """HANDOFF_TYPE lists -> list<schema.PROPOSAL_TYPE> lists (rank, score, bbox, area, rle, scale),
    the same images and order; every proposal of a chunk in one pass (strings: one pycocotools
    call per image). A chunked column is encoded chunk by chunk into a chunked column: combining
    the chunks would copy every run (~1.4 MB per 480x640 image of 1000 proposals).

    heights, widths: (B,) each image's size: every mask's runs must cover its image exactly
    (a ValueError naming the first image whose runs do not)."""
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    if not isinstance(column, pa.ChunkedArray):
        return _encode_array(column, heights, widths, 0)
    parts, start = [], 0
    for chunk in column.chunks:
        stop = start + len(chunk)
        parts.append(_encode_array(chunk, heights[start:stop], widths[start:stop], start))
        start = stop
    return pa.chunked_array(parts, pa.list_(PROPOSAL_TYPE))


def _encode_array(column: pa.Array, heights: np.ndarray, widths: np.ndarray, first: int) -> pa.Array:
    """encode_column of one array; `first`: the index of its first image in the batch (for errors)."""
    pixels = heights * widths
    per_image = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)  # (B,)
    flat = pc.list_flatten(column)  # (P,) structs; respects slices
    score, box, area, scale, runs = flat.flatten()
    lengths = pc.list_value_length(runs).to_numpy().astype(np.int64)  # (P,)
    counts = pc.list_flatten(runs).to_numpy(zero_copy_only=False)  # (R,) uint32
    covered = np.add.reduceat(counts, _offsets(lengths)[:-1], dtype=np.int64) if len(counts) else np.zeros(0)
    owner = np.repeat(np.arange(len(per_image)), per_image)  # (P,) image of each proposal
    bad = (lengths == 0) | (covered != np.asarray(pixels, np.int64)[owner])
    if bad.any():
        i = int(owner[np.argmax(bad)])
        raise ValueError(f"image {first + i} of the batch: a mask's run lengths do not cover its {int(pixels[i])} pixels")
    rle = _compress(counts, lengths, owner, heights, widths)
    starts = _offsets(per_image)
    rank = np.arange(len(lengths), dtype=np.int32) - np.repeat(starts[:-1], per_image).astype(np.int32)
    bbox = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * len(lengths) + 1, 4, dtype=np.int32)),
                                    pc.list_flatten(box))
    struct = pa.StructArray.from_arrays([pa.array(rank), score, bbox, area, rle, scale], fields=list(PROPOSAL_TYPE))
    return pa.ListArray.from_arrays(pa.array(starts.astype(np.int32)), struct)


def _compress(counts: np.ndarray, lengths: np.ndarray, owner: np.ndarray, heights: np.ndarray,
              widths: np.ndarray) -> pa.Array:
    """(R,) runs of (P,) masks -> their COCO compressed RLE strings as one Arrow string array.

    pycocotools' C encoder, one frPyObjects call per image over views of `counts`: measured ~5x
    faster than the all-numpy `ifcn.ops.rle.compress` (which equals it byte for byte, tests/test_rle.py)
    on 1000 masks of a 480x640 image (bench/README.md, CPU side)."""
    bounds = _offsets(lengths).tolist()  # Python ints: slicing with them is ~3x faster than with numpy ints
    strings: list[bytes] = []
    for i in np.unique(owner):
        first, last = (int(v) for v in np.searchsorted(owner, [i, i + 1]))
        h, w = int(heights[i]), int(widths[i])
        size = [h, w]  # one list for every mask of the image (pycocotools only reads it)
        objs = [{"counts": counts[a:b], "size": size} for a, b in zip(bounds[first:last], bounds[first + 1:last + 1])]
        strings.extend(r["counts"] for r in mask_utils.frPyObjects(objs, h, w))
    offsets = _offsets(np.fromiter(map(len, strings), np.int64, len(strings)))
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} bytes of RLE strings in one batch: more than an Arrow string column "
                         f"holds; use a smaller batch size")
    return pa.StringArray.from_buffers(len(strings), pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(b"".join(strings)))


def _offsets(sizes: np.ndarray) -> np.ndarray:
    """(n,) sizes -> (n + 1,) int64 offsets 0, sizes[0], sizes[0] + sizes[1], ..."""
    out = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=out[1:])
    return out
