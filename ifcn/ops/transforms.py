"""Image -> network input: resize to a short side, normalise with ImageNet statistics."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .upload import constant, pinned_empty, upload

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scaled_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the short side at `short_side`, unless that pushes the long side past `max_size`."""
    factor = short_side / min(height, width)
    if max(height, width) * factor > max_size:
        factor = max_size / max(height, width)
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def image_to_tensor(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1] on `device`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. decoded buffers)
        image = image.copy()
    t = upload(np.ascontiguousarray(image), device)
    return t.permute(2, 0, 1)[None].float().div_(255.0)  # (1, 3, H, W)


Stacks = dict[tuple[int, int], tuple[torch.Tensor, list[int]]]


def images_to_tensor(images: list[np.ndarray], device: torch.device | str = "cpu"
                     ) -> dict[tuple[int, int], tuple[torch.Tensor, list[int]]]:
    """(H, W, 3) uint8 images -> per distinct (H, W): ((n, 3, H, W) float in [0, 1] on `device`, the
    images' indices): `upload_stacks(stack_images(...))`."""
    return upload_stacks(stack_images(images, device), device)


def stack_images(images: list[np.ndarray], device: torch.device | str = "cpu") -> Stacks:
    """The host half of images_to_tensor: per distinct (H, W), the images of that size stacked into one
    (n, H, W, 3) uint8 host tensor (page-locked when `device` is a GPU) and their indices. A caller
    can run it on its own thread, so the thread that feeds the device only queues the copies."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        groups.setdefault(tuple(int(v) for v in image.shape[:2]), []).append(i)
    out = {}
    for shape, idx in groups.items():
        stacked = pinned_empty((len(idx), *shape, 3), torch.uint8, device)  # writeable, whatever the inputs
        np.stack([images[i] for i in idx], out=stacked.numpy())
        out[shape] = (stacked, idx)
    return out


def upload_stacks(stacks: Stacks, device: torch.device | str = "cpu"
                  ) -> dict[tuple[int, int], tuple[torch.Tensor, list[int]]]:
    """The device half: each stack uploaded without waiting (ifcn.ops.upload), then (n, 3, H, W) float in
    [0, 1] on `device`: one copy and one cast a size."""
    return {shape: (upload(t, device).permute(0, 3, 1, 2).float().div_(255.0), idx)
            for shape, (t, idx) in stacks.items()}


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, h, w), antialiased so small scales do not alias."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> ImageNet-normalised, as VGG-16 was trained."""
    mean = constant(IMAGENET_MEAN, images.device, images.dtype)[:, None, None]  # made once per device
    std = constant(IMAGENET_STD, images.device, images.dtype)[:, None, None]
    return (images - mean) / std
