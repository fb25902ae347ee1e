"""Host-to-device copies that do not wait: the one way the inference path puts host data on a device.

A copy from pageable memory to a CUDA device synchronises the host with the stream (the driver
bounces it through a staging buffer first); one from page-locked (pinned) memory with
`non_blocking=True` is queued like a kernel. So every upload goes through `upload` (pinned,
non-blocking), constants are made once per device (`constant`), and on the CPU nothing is copied.
tests/test_device_ops.py holds the inference path to it (no other host-to-device copy), and
tests/test_gpu.py counts the syncs with CUDA's sync debug mode where a GPU is lent.
"""
from __future__ import annotations

import functools

import numpy as np
import torch


def upload(a: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host array on `device` without waiting: pinned (if not already) and copied non-blocking;
    on the CPU the array itself, as a tensor. The pinned buffer lives until the copy is done (torch's
    caching host allocator records the copy's stream)."""
    device = torch.device(device)
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host buffer to fill before `upload`: page-locked when the target is a CUDA device."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


@functools.lru_cache(maxsize=64)
def constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor, made once per (values, device, dtype): no copy on later calls."""
    return upload(torch.tensor(values, dtype=dtype), device)
