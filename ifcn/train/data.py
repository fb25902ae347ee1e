"""Training examples read, decoded and augmented ahead of the step, in DataLoader worker processes.

Every step's image and random draws depend only on (seed, step, rank), never on which worker
made the example or when, so a resumed run and a DDP run see exactly what a straight run sees:

    rng = np.random.default_rng([seed, step, rank])
    window-sampling seed = rng.integers(2**62)        (drawn first)
    augmentation (flip, scale) draws from rng         (then)

With `workers=0` the same examples are made in the training process, one step at a time
(no prefetch: the comparison point of bench/train.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ifcn.data.coco import CocoDataset

from .sampling import Example, augment


def image_index(step: int, rank: int, world: int, num_images: int, seed: int) -> int:
    """Image for (step, rank): epochs of per-epoch permutations, workers interleaved, resumable."""
    g = step * world + rank
    epoch, pos = divmod(g, num_images)
    return int(np.random.default_rng([seed, epoch]).permutation(num_images)[pos])


@dataclass
class StepInput:
    """What one step trains on: the augmented example, its image, and the window sampler's seed."""

    step: int
    index: int  # position of the image in the annotations' image list
    image_id: int  # the COCO image id (what ranks record to show they saw different images)
    generator_seed: int  # seeds the torch.Generator that samples this step's windows
    example: Example

    def pin_memory(self) -> "StepInput":
        """DataLoader(pin_memory=True) calls this: page-locked images copy to the GPU faster."""
        self.example.image = self.example.image.pin_memory()
        return self


class StepDataset(Dataset):
    """Map-style dataset over steps [start, end) of one rank: item i is step start + i."""

    def __init__(self, dataset: CocoDataset, start: int, end: int, rank: int, world: int, seed: int,
                 scales: tuple[int, ...], max_size: int, flip: bool) -> None:
        self.dataset, self.start, self.end = dataset, start, end
        self.rank, self.world, self.seed = rank, world, seed
        self.scales, self.max_size, self.flip = scales, max_size, flip

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, i: int) -> StepInput:
        step = self.start + i
        rng = np.random.default_rng([self.seed, step, self.rank])
        generator_seed = int(rng.integers(2**62))
        index = image_index(step, self.rank, self.world, len(self.dataset), self.seed)
        sample = self.dataset[index]
        example = augment(sample.image, sample.masks, sample.boxes, sample.iscrowd, rng, self.scales,
                          self.max_size, self.flip)
        return StepInput(step, index, int(sample.image_id), generator_seed, example)


def _identity(item: StepInput) -> StepInput:
    return item


def step_loader(dataset: CocoDataset, start: int, end: int, rank: int, world: int, seed: int,
                scales: tuple[int, ...], max_size: int, flip: bool, workers: int, prefetch: int,
                pin_memory: bool = False) -> DataLoader:
    """StepInputs for steps start..end-1 in order; `workers` processes each keep `prefetch` steps ready.

    Workers are forked (cheap: the annotations are shared copy-on-write) and use one torch thread
    each, so they take CPU from the training step only while they decode.
    """
    steps = StepDataset(dataset, start, end, rank, world, seed, scales, max_size, flip)
    extra = {"prefetch_factor": prefetch} if workers > 0 else {}
    return DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                      pin_memory=pin_memory, **extra)


def generator(item: StepInput) -> torch.Generator:
    """The step's window-sampling generator (made here: a Generator does not cross processes)."""
    return torch.Generator().manual_seed(item.generator_seed)
