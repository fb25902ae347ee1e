"""pipeline.InstanceFCNTransform: the model step as a Ray Data transform, equal to ifcn.Predictor
on the same images (called directly, and inside ray.data map_batches)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ifcn
from segment_helpers import write_checkpoint

SCALES = (64, 96)


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (80, 112, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64), dtype=np.uint8)]


def expected(ckpt: str) -> list[list[dict]]:
    """The reference: ifcn.Predictor on the same images (grayscale repeated to RGB), rle counts only."""
    predictor = ifcn.Predictor(ifcn.load_checkpoint(ckpt), ifcn.InferenceConfig(scales=SCALES, max_proposals=5))
    rgb = [images()[0], np.repeat(images()[1][:, :, None], 3, axis=2)]
    return [[{"rank": i, "score": p["score"], "bbox": p["bbox"], "area": p["area"], "rle": p["rle"]["counts"],
              "scale": p["scale"]} for i, p in enumerate(predictor.predict(im))] for im in rgb]


def test_transform_on_a_batch_equals_the_predictor(tmp_path: Path) -> None:
    from pipeline import InstanceFCNTransform

    ckpt = write_checkpoint(tmp_path / "m.pt")
    t = InstanceFCNTransform(ckpt, scales=SCALES, max_proposals=5)
    ragged = np.array(images() + [None], dtype=object)[:2]  # an object column of differently sized images
    batch = {"image": ragged, "path": np.array(["a.png", "b.png"])}
    out = t(batch)
    assert list(out["path"]) == ["a.png", "b.png"] and "image" not in out
    assert list(out["height"]) == [80, 64] and list(out["width"]) == [112, 64]
    assert [list(p) for p in out["proposals"]] == expected(ckpt)
    assert list(out["num_proposals"]) == [len(p) for p in expected(ckpt)] and out["num_proposals"][0] == 5
    with pytest.raises(ValueError, match="must be uint8"):
        t({"image": [np.zeros((8, 8, 3), np.float32)]})


@pytest.mark.slow
def test_transform_in_ray_data_map_batches(tmp_path: Path) -> None:
    import ray

    from pipeline import InstanceFCNTransform

    ckpt = write_checkpoint(tmp_path / "m.pt")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        ds = ray.data.from_items([{"image": im, "i": i} for i, im in enumerate(images())])
        rows = ds.map_batches(InstanceFCNTransform, fn_constructor_kwargs={"checkpoint": ckpt, "scales": SCALES,
                                                                           "max_proposals": 5},
                              batch_size=1, concurrency=1).take_all()
    finally:
        ray.shutdown()
    rows.sort(key=lambda r: r["i"])
    got = [[{**p, "bbox": [float(v) for v in p["bbox"]]} for p in r["proposals"]] for r in rows]
    assert [[p["rle"] for p in g] for g in got] == [[p["rle"] for p in e] for e in expected(ckpt)]
    assert [[pytest.approx(p["score"]) for p in g] for g in got] == [[p["score"] for p in e] for e in expected(ckpt)]
