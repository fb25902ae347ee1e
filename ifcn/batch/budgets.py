"""The batched postprocess's memory budgets, by device type: each bounds one step's buffers whatever the
batch, and a batch beyond it takes more steps (one more host sync each), never more memory.

`device_budget(table, device)` reads a table for a device (a device type not named: the CUDA figure).
Used by ifcn.batch.postprocessing (the paste of the kept windows), ifcn.batch.masknms (its rounds, store and
pair steps) and ifcn.batch.maskpairs (nms.IOU_BLOCK rows of pair bounds).
"""
from __future__ import annotations

import torch

# Kept-mask pixels pasted per step (per batch, padded blocks of paste.paste_dense), by device type:
# bounds the step's buffers (~10 bytes a padded pixel at the peak: 2.7 GB on a GPU) whatever the
# images; a batch beyond it pastes in several steps (one host sync each). 480x640 images keep ~25-30 k
# box pixels per proposal at the paper's defaults (~30 M per image, ~45 M padded), so a batch of 16
# takes three steps on a GPU. Mask NMS pastes its rounds' windows in steps of the same budget.
PIXEL_BUDGET = {"cuda": 1 << 28, "cpu": 1 << 25}
# Mask NMS: windows per image that one round settles, by device type. A round holds their masks
# (1 byte a pixel) and a (B, R, K + R) pair matrix against the K = max_proposals kept so far, so
# R bounds that memory; windows past the point where an image has max_proposals kept are never
# pasted. The paper's 6000 windows per image take at most six rounds on a GPU.
MASK_ROUND = {"cuda": 1024, "cpu": 256}
# Mask NMS: the candidate pairs' intersections read a quarter as many 32-pixel words a step (~75 bytes
# a budget unit at the peak; a step held as many pixels at ~100 bytes each before they were packed).
PAIR_PIXEL_BUDGET = {"cuda": 1 << 27, "cpu": 1 << 23}
# Mask NMS: box pixels (1 byte each) its flat store holds per batch, by device type: 2 GB on a GPU
# (a batch of 16 480x640 images needs ~1 GB, so it stays on the stored path) and 128 MB on a CPU.
# A round's windows get what the kept masks leave (at least half); kept masks past half of it are
# not stored but re-pasted in chunks of the rest for each round (`masknms._chunked_intersections`).
STORE_PIXEL_BUDGET = {"cuda": 1 << 31, "cpu": 1 << 27}


def device_budget(table: dict[str, int], device: torch.device) -> int:
    """table's figure for the device's type (the CUDA one for a type it does not name)."""
    return table.get(device.type, table["cuda"])
