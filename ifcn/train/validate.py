"""Validation while training: AR@100 of the current weights on the first N held-out images.

The images are read and decoded once (the pipeline's decoder, as jobs.evaluate does); each
validation runs the model's predictor (ifcn.inference.predictor.predictor_for; ifcn.Predictor for InstanceFCN) on a
copy of the model (eval mode, the training scales) and scores the proposals with
ifcn.evaluation.recall.average_recall, the same code as jobs.evaluate.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ifcn.config import InferenceConfig
from ifcn.data.coco import CocoDataset
from ifcn.evaluation.recall import average_recall, predictions_to_results
from ifcn.inference.predictor import predictor_for
from ifcn.models import registry as models


class Validator:
    """Holds the decoded validation images; `__call__(model)` -> {"AR@10", "AR@100", ..., "val_s"}."""

    def __init__(self, model: str, images: str, annotations: str, max_images: int, scales: tuple[int, ...],
                 device: torch.device, storage_options: dict | None = None) -> None:
        dataset = CocoDataset(images, annotations, storage_options)
        if len(dataset) == 0:
            raise ValueError(f"--val-annotations {annotations}: no images to validate on")
        n = min(max_images, len(dataset))
        self.gt = dataset.coco
        self.ids = [int(dataset.images[i]["id"]) for i in range(n)]
        self.pixels = [dataset.read_image(i) for i in range(n)]
        self.config = InferenceConfig(scales=tuple(scales))
        self.device = device
        models.get(model)  # a known name, or a one-line error now rather than at the first validation

    def __call__(self, model: nn.Module) -> dict[str, float]:
        t = time.monotonic()
        # A copy: predictors switch their model to eval mode (and channels_last); the training model stays as is.
        predictor = predictor_for(copy.deepcopy(model), self.config, self.device)
        results: list[dict[str, Any]] = []
        with torch.inference_mode():
            for image_id, pixels in zip(self.ids, self.pixels):
                results += predictions_to_results(image_id, predictor.predict(pixels))
        ar = average_recall(self.gt, results, image_ids=self.ids)
        return {**ar, "val_s": time.monotonic() - t, "val_images": float(len(self.ids))}


def is_better(ar100: float, best: float | None) -> bool:
    """Strictly better (ties keep the earlier checkpoint); nan never is."""
    return not np.isnan(ar100) and (best is None or ar100 > best)
