"""InstanceFCN as a Ray Data transform, for users who put it inside their own pipelines.

    import ray
    from pipeline import InstanceFCNTransform

    ds = ray.data.read_images("s3://bucket/images/", mode="RGB", include_paths=True)
    ds = ds.map_batches(InstanceFCNTransform, fn_constructor_kwargs={"checkpoint": "s3://bucket/ifcn.pt"},
                        batch_size=4, concurrency=2)   # leave CPUs for the reads; num_gpus=1 per actor on GPUs
    ds.write_parquet("s3://bucket/proposals/")                  # or .iter_rows(), .to_pandas(), ...

Each actor loads the checkpoint once and keeps the model for every batch (a callable class, so
map_batches runs it in an actor pool). A batch is a dict of columns with `image`: (H, W, 3) uint8
arrays (read_images' layout; grayscale and RGBA are converted); the transform returns the batch's
other columns unchanged plus `height`, `width`, `num_proposals` and `proposals`: per image a list
of {rank, score, bbox (x, y, w, h), area, rle (COCO compressed counts of an height x width mask),
scale}, best first, as the segment job stores them (pipeline.tables.schema.PROPOSAL_TYPE).

This is the model step alone: no listing, resume, table commits or error rows. For a bucket job
use jobs.segment (ifcn-segment), which adds them.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class InstanceFCNTransform:
    """A map_batches-ready callable class: __init__ loads the model, __call__ segments a batch."""

    def __init__(self, checkpoint: str, scales: tuple[int, ...] | None = None, max_proposals: int | None = None,
                 config: Any = None, device: str | None = None, storage_options: dict[str, Any] | None = None,
                 image_column: str = "image") -> None:
        """checkpoint: ifcn checkpoint URL; scales / max_proposals override `config` (an
        ifcn.InferenceConfig, default the paper's); device: torch device (default cuda if present)."""
        from dataclasses import replace

        from ifcn import InferenceConfig, Predictor, load_checkpoint

        config = config or InferenceConfig()
        overrides = {k: v for k, v in (("scales", scales), ("max_proposals", max_proposals)) if v is not None}
        self.config = replace(config, **overrides)
        self.predictor = Predictor(load_checkpoint(checkpoint, storage_options), self.config, device=device)
        self.image_column = image_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [_rgb(np.asarray(image)) for image in batch[self.image_column]]
        results = [self.predictor.predict(image) for image in images] if images else []
        out = {k: v for k, v in batch.items() if k != self.image_column}
        out["height"] = np.array([i.shape[0] for i in images], np.int32)
        out["width"] = np.array([i.shape[1] for i in images], np.int32)
        out["num_proposals"] = np.array([len(r) for r in results], np.int32)
        proposals = np.empty(len(results), dtype=object)  # one list per image (ragged)
        proposals[:] = [[{"rank": rank, "score": p["score"], "bbox": p["bbox"], "area": p["area"],
                          "rle": p["rle"]["counts"], "scale": p["scale"]} for rank, p in enumerate(r)]
                        for r in results]
        out["proposals"] = proposals
        return out


def _rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1|3|4) -> (H, W, 3) uint8."""
    if image.dtype != np.uint8:
        raise ValueError(f"InstanceFCNTransform: images must be uint8, got {image.dtype}; read them with "
                         f"ray.data.read_images(..., mode='RGB')")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])
