"""The inference actor against a CPU Predictor run image by image (the reference: what is under test
here is the batching, the device thread and the error handling around it, not the model's ops).

Run: pytest tests/test_infer_actor.py -q
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from ifcn import InferenceConfig, InstanceFCN, Predictor
from pipeline.stages.infer import STATS_DIR_ENV, InferenceActor, unpack_proposals
from test_device_ops import _assert_same, _image

CONFIG = InferenceConfig(scales=(40, 72), windows_per_scale=30, max_proposals=20)


def _batch(images: list[np.ndarray | None], tag: str = "", pixels: dict[int, bytes] | None = None) -> pa.Table:
    """What the read stage hands the actor: one row per image (None: a row the read stage failed)."""
    pixels = pixels or {}
    ok = [im is not None for im in images]
    return pa.table({
        "image_id": [f"{tag}{i}" for i in range(len(images))],
        "uri": [f"mem://{tag}{i}.png" for i in range(len(images))],
        "shard_id": ["0"] * len(images),
        "width": pa.array([im.shape[1] if im is not None else None for im in images], pa.int32()),
        "height": pa.array([im.shape[0] if im is not None else None for im in images], pa.int32()),
        "read_ms": pa.array([1.0] * len(images), pa.float32()),
        "decode_ms": pa.array([1.0] * len(images), pa.float32()),
        "status": ["ok" if o else "error" for o in ok],
        "error": [None if o else "image: not an image" for o in ok],
        "pixels": pa.array([pixels.get(i, im.tobytes()) if im is not None else b"" for i, im in enumerate(images)],
                           pa.large_binary()),
    })


def _assert_matches_reference(out: pa.Table, images: list[np.ndarray | None], model: nn.Module) -> None:
    reference = Predictor(model, CONFIG, device="cpu", postprocess_on="numpy")
    column = out.column("proposals").combine_chunks()
    for i, (image, status) in enumerate(zip(images, out.column("status").to_pylist())):
        if image is None:
            continue
        assert status == "ok"
        want = reference.proposals([image])[0]
        assert len(want) > 0
        _assert_same(unpack_proposals(column, i, image.shape[:2]), want, score_rtol=1e-5)  # batched convs sum in another order


@pytest.mark.parametrize("postprocess_on", ["numpy", "device"])
def test_batch_equals_image_by_image_reference(model: InstanceFCN, postprocess_on: str) -> None:
    images = [_image(0, (50, 70)), _image(1, (50, 70)), None, _image(2, (70, 50)), _image(3, (50, 70))]
    actor = InferenceActor.of(Predictor(model, CONFIG, device="cpu", postprocess_on=postprocess_on))
    out = actor(_batch(images))
    assert out.column("image_id").to_pylist() == ["0", "1", "2", "3", "4"]
    assert out.column("status").to_pylist() == ["ok", "ok", "error", "ok", "ok"]
    assert out.column("error")[2].as_py() == "image: not an image"  # the read stage's verdict passes through
    _assert_matches_reference(out, images, model)
    infer_ms = out.column("infer_ms").to_pylist()
    assert infer_ms[2] is None and all(v > 0 for i, v in enumerate(infer_ms) if i != 2)
    assert (actor.stats.batches, actor.stats.images) == (1, 4)
    assert actor.stats.device_ms == pytest.approx(actor.stats.forward_ms + actor.stats.postprocess_ms)


def test_bad_pixels_fail_only_their_image(model: InstanceFCN) -> None:
    images = [_image(0, (50, 70)), _image(1, (50, 70)), _image(2, (50, 70))]
    truncated = images[1].tobytes()[:-5]
    out = InferenceActor.of(Predictor(model, CONFIG, device="cpu"))(_batch(images, pixels={1: truncated}))
    assert out.column("status").to_pylist() == ["ok", "error", "ok"]
    assert out.column("error")[1].as_py().startswith("image mem://1.png: inference failed (ValueError")
    assert out.column("proposals")[1].as_py() == []
    _assert_matches_reference(out, [images[0], None, images[2]], model)


class FailsOnLargeInputs(nn.Module):
    """The model, except that a forward over more than `limit` input pixels raises what PyTorch raises
    when CUDA runs out of memory (a RuntimeError naming CUDA), or a ValueError (a bug, not the machine's)."""

    def __init__(self, model: InstanceFCN, limit: int, error: type[Exception]) -> None:
        super().__init__()
        self.model, self.config, self.limit, self.error = model, model.config, limit, error

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 9.00 GiB")
        return self.model(x)


@pytest.mark.parametrize("error, status", [(RuntimeError, "retry"), (ValueError, "error")])
def test_a_failing_batch_reruns_image_by_image(model: InstanceFCN, error: type[Exception], status: str) -> None:
    """One large image makes the batch's forward fail: the batch re-runs image by image, only the large one
    fails (transient CUDA / OOM -> "retry", left for a re-run; anything else -> an error row)."""
    images = [_image(0, (50, 70)), _image(1, (50, 200)), _image(2, (70, 50))]
    net = FailsOnLargeInputs(model, limit=10_000, error=error)  # at scale 72: 72x101 and 101x72, but 72x288
    out = InferenceActor.of(Predictor(net, CONFIG, device="cpu"))(_batch(images))
    assert out.column("status").to_pylist() == ["ok", status, "ok"]
    reason = out.column("error")[1].as_py()
    assert reason.startswith("image mem://1.png: inference failed (") and f"({error.__name__}: CUDA out of" in reason
    assert reason.endswith("; left for a re-run") == (status == "retry")
    _assert_matches_reference(out, [images[0], None, images[2]], model)


class RecordsThreads(nn.Module):
    """The model, noting which thread ran each forward."""

    def __init__(self, model: InstanceFCN) -> None:
        super().__init__()
        self.model, self.config, self.threads = model, model.config, []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.threads.append(threading.current_thread().name)
        return self.model(x)


def test_batches_in_flight_from_several_threads(model: InstanceFCN, tmp_path, monkeypatch) -> None:
    """Calls from several threads at once (Ray Data's concurrent calls of one actor): every device half
    runs on the actor's one device thread, and each call gets its own batch's results, rows in order;
    with STATS_DIR_ENV set, one line per batch."""
    monkeypatch.setenv(STATS_DIR_ENV, str(tmp_path))
    net = RecordsThreads(model)
    actor = InferenceActor.of(Predictor(net, CONFIG, device="cpu", postprocess_on="device"))
    batches = [[_image(10 * b + i, (50, 70) if i % 2 else (60, 44)) for i in range(3)] for b in range(4)]
    outs: dict[int, pa.Table] = {}
    start = threading.Barrier(len(batches))

    def call(b: int) -> None:
        start.wait()
        outs[b] = actor(_batch(batches[b], tag=f"b{b}-"))

    threads = [threading.Thread(target=call, args=(b,), name=f"caller-{b}") for b in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(net.threads) == {"ifcn-device_0"}
    assert (actor.stats.batches, actor.stats.images) == (4, 12)
    lines = [json.loads(line) for line in (tmp_path / f"{os.getpid()}.jsonl").read_text().splitlines()]
    assert [r["images"] for r in lines] == [3, 3, 3, 3]
    assert sum(r["device_ms"] for r in lines) == pytest.approx(actor.stats.device_ms)
    for b, images in enumerate(batches):
        assert outs[b].column("image_id").to_pylist() == [f"b{b}-{i}" for i in range(3)]
        _assert_matches_reference(outs[b], images, model)


def test_gpu_actors_take_concurrent_calls_and_cpu_actors_do_not() -> None:
    """The overlap needs Ray Data to make CONCURRENT_CALLS calls of one GPU actor at once."""
    import ray.data

    from pipeline.stages.infer import CONCURRENT_CALLS
    from pipeline.graph import Resources, _overlap

    gpu = ray.data.ActorPoolStrategy(size=2, **_overlap(Resources(2, 1.0, 1.0, False, 16)))
    assert gpu.max_concurrent_calls_per_actor == CONCURRENT_CALLS == 2 and gpu._enable_true_multi_threading
    assert _overlap(Resources(2, 0.0, 0.75, True, 4)) == {}


# The host planning of the postprocess (numpy over what the device read back) and the numpy path itself,
# by the module defining each; the test spies on it in every ifcn module that binds it.
PLANNING = (("ifcn.batch.pasteplan", "paste_plan"), ("ifcn.batch.pasteplan", "_dense_plan"),
            ("ifcn.batch.pasteplan", "step_ranges"), ("ifcn.batch.masknms", "_round_widths"),
            ("ifcn.batch.masknms", "_first_kept_host"), ("ifcn.batch.pasteruns", "_assemble"),
            ("ifcn.inference.predictor", "_postprocess_numpy"))


@pytest.mark.parametrize("nms, postprocess_on", [("box", "device"), ("mask", "device"), ("box", "numpy")])
def test_the_device_thread_runs_no_host_planning(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch, nms: str,
                                                 postprocess_on: str) -> None:
    """The device half yields its host planning (ifcn.batch.hostwork): paste plans, steps, mask NMS's rounds
    and chunks (a store budget of a few masks: kept masks pasted again in chunks), the per-image arrays
    and the numpy reference run on the calling thread, never on the device thread; results unchanged;
    with call_spans set, the call's host and device spans are recorded."""
    import importlib
    import sys

    import ifcn.batch.budgets as budgets

    threads: dict[str, set[str]] = {}
    for module, name in PLANNING:
        original = getattr(importlib.import_module(module), name)

        def spy(*a, _name=name, _original=original):
            threads.setdefault(_name, set()).add(threading.current_thread().name)
            return _original(*a)

        holders = [m for key, m in list(sys.modules.items())
                   if key.startswith("ifcn.") and getattr(m, name, None) is original]  # where callers look it up
        for holder in holders:
            monkeypatch.setattr(holder, name, spy)
    monkeypatch.setitem(budgets.STORE_PIXEL_BUDGET, "cpu", 4_000)
    config = InferenceConfig(scales=CONFIG.scales, windows_per_scale=30, max_proposals=20, nms=nms)
    actor = InferenceActor.of(Predictor(model, config, device="cpu", postprocess_on=postprocess_on))
    actor.call_spans = []
    images = [_image(0, (50, 70)), _image(1, (60, 44))]
    out = actor(_batch(images))
    assert out.column("status").to_pylist() == ["ok", "ok"]
    wanted = {"_postprocess_numpy"} if postprocess_on == "numpy" else \
        {"paste_plan", "_dense_plan", "_assemble"} | ({"_round_widths", "step_ranges", "_first_kept_host"} if nms == "mask" else set())
    assert wanted <= set(threads), threads  # they ran ...
    assert all(t == {threading.current_thread().name} for t in threads.values()), threads  # ... on this thread only
    reference = Predictor(model, config, device="cpu", postprocess_on="numpy")
    column = out.column("proposals").combine_chunks()
    for i, image in enumerate(images):
        _assert_same(unpack_proposals(column, i, image.shape[:2]), reference.proposals([image])[0], score_rtol=1e-5)
    (spans,) = actor.call_spans
    kinds = [kind for kind, _, _ in spans]
    assert kinds[0] == "host" and kinds[-1] == "host" and "device" in kinds
    assert all(a <= b for _, a, b in spans)


def test_device_time_counts_overlapping_spans_once() -> None:
    """Concurrent calls interleave their device segments: their spans overlap on the actor's timeline,
    and device_ms counts each moment once (what bench/gpu.py's busy share divides by wall time)."""
    from pipeline.stages.infer import DeviceStats

    stats = DeviceStats()
    assert stats.add(2, 0.0, 5.0, 10.0) == 10.0
    assert stats.add(2, 4.0, 6.0, 12.0) == 2.0  # [4, 10] already counted
    assert stats.add(1, 6.0, 7.0, 9.0) == 0.0  # inside
    assert stats.add(1, 20.0, 21.0, 22.0) == 2.0
    assert (stats.batches, stats.images, stats.device_ms) == (4, 6, 14.0)
    assert (stats.forward_ms, stats.postprocess_ms) == (5.0 + 2.0 + 1.0 + 1.0, 5.0 + 6.0 + 2.0 + 1.0)
