"""Faults and floors of the device path: a sticky CUDA error ends the actor's process (Ray Data
restarts it and retries the batch) instead of turning the rest of the bucket into retry rows; the
dependency floors in pyproject.toml are the ones ifcn/floors.py checks at import, in one line.
Run: pytest tests/test_device_faults.py -q
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import pipeline.stages.infer as infer
from ifcn import InferenceConfig, InstanceFCN, Predictor
from ifcn.floors import FLOORS, DependencyTooOldError, require, version_tuple
from test_device_ops import _image
from test_infer_actor import _batch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = InferenceConfig(scales=(40, 72), windows_per_scale=30, max_proposals=20)


class FailsOnce(nn.Module):
    """The model, raising `message` as a RuntimeError on its `at`-th forward (as CUDA reports a lost context)."""

    def __init__(self, model: InstanceFCN, message: str, at: int = 1) -> None:
        super().__init__()
        self.model, self.config, self.message, self.at, self.calls = model, model.config, message, at, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError(self.message)
        return self.model(x)


class Exited(Exception):
    pass


@pytest.mark.parametrize("message", [
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
])
def test_sticky_cuda_error_exits_the_actor(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    """The batch's forward raises a sticky CUDA error: the actor exits (here: the exit is recorded)
    at once, without re-running image by image and without returning retry rows."""
    exits = []

    def exit_for_restart(e: BaseException) -> None:
        exits.append(e)
        raise Exited

    monkeypatch.setattr(infer, "_exit_for_restart", exit_for_restart)
    net = FailsOnce(model, message)
    actor = infer.InferenceActor.of(Predictor(net, CONFIG, device="cpu"))
    with pytest.raises(Exited):
        actor(_batch([_image(0, (50, 70)), _image(1, (60, 40))]))
    assert len(exits) == 1 and str(exits[0]) == message
    assert net.calls == 1  # no image-by-image re-run: each would fail the same way


def test_other_cuda_errors_still_give_retry_rows(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error is the batch's, not the context's: image by image, retry rows, no exit."""
    monkeypatch.setattr(infer, "_exit_for_restart", lambda e: pytest.fail(f"exited on {e}"))
    net = FailsOnce(model, "CUDA out of memory. Tried to allocate 9.00 GiB", at=1)
    out = infer.InferenceActor.of(Predictor(net, CONFIG, device="cpu"))(_batch([_image(0, (50, 70))]))
    assert out.column("status").to_pylist() == ["ok"]  # the re-run succeeds
    assert not infer.sticky_cuda_error(RuntimeError("CUDA out of memory")) and not infer.sticky_cuda_error(
        ValueError("device-side assert"))


def test_exit_for_restart_ends_the_process_with_one_line() -> None:
    code = ("import pipeline.stages.infer as i; "
            "i._exit_for_restart(RuntimeError('CUDA error: an illegal memory access was encountered\\nmore'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == infer.EXIT_DEVICE_LOST
    lines = [ln for ln in done.stderr.splitlines() if "CUDA context is lost" in ln]
    assert len(lines) == 1 and "illegal memory access" in lines[0] and "Ray restarts" in lines[0]


def test_pyproject_floors_are_the_checked_ones() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        found = re.match(r"([A-Za-z0-9_-]+)(?:\[[^\]]*\])?>=([0-9.]+)", dep)
        if found and found.group(1) in FLOORS:
            floors[found.group(1)] = version_tuple(found.group(2))
    assert floors == FLOORS


def test_installed_versions_pass_and_older_ones_fail_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for package in FLOORS:
        require(package)  # this environment
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"torch": "2.4.1+cu121", "ray": "2.9.3"}[name])
    for package, old in (("torch", "2.4.1+cu121"), ("ray", "2.9.3")):
        with pytest.raises(DependencyTooOldError) as raised:
            require(package)
        text = str(raised.value)
        floor = ".".join(map(str, FLOORS[package]))
        assert "\n" not in text and f"{package} {old} is installed" in text and f"pip install '{package}>={floor}'" in text
    assert version_tuple("2.13.0+cpu") == (2, 13) and version_tuple("2.60.0") == (2, 60)


def test_images_are_stacked_off_the_device_thread(model: InstanceFCN, monkeypatch: pytest.MonkeyPatch) -> None:
    """The actor stacks a batch's images (into page-locked memory on CUDA) on the calling thread: the
    device thread only uploads and runs device work (Predictor.windows stacks nothing itself)."""
    import threading

    import ifcn.inference.predictor as predictor_module

    where = []
    real = infer.stack_images

    def stack(images, device):
        where.append(threading.current_thread().name)
        return real(images, device)

    monkeypatch.setattr(infer, "stack_images", stack)
    monkeypatch.setattr(predictor_module, "stack_images", lambda *a: pytest.fail("stacked on the device thread"))
    images = [_image(0, (50, 70)), _image(1, (50, 70)), _image(2, (60, 40))]
    out = infer.InferenceActor.of(Predictor(model, CONFIG, device="cpu"))(_batch(images))
    assert out.column("status").to_pylist() == ["ok"] * 3
    assert where == [threading.current_thread().name] and not where[0].startswith("ifcn-device")
