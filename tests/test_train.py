"""Training loop (loss falls, checkpoints round-trip, resume), jobs.train CLI, Ray Train, baseline."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import ifcn
from ifcn import baseline
from ifcn.data import SynthConfig, write_synthetic_dataset
from ifcn.train import TrainConfig, train, train_local
from ifcn.train.loop import load_state

# 64 px images with 29-42 px objects at short side 160 (x2.5): 72-104 px, around the 96 px positives.
TINY = SynthConfig(size=64, min_objects=2, max_objects=3, min_object=0.45, max_object=0.65, min_area=60)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic_dataset(str(root), 2, seed=3, config=TINY)
    return root


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(images=str(data / "images"), annotations=str(data / "annotations.json"), output=str(out),
                backbone="vgg16_narrow", scales=(160,), steps=200, lr_step=150, warmup_steps=3, lr=0.02,
                windows_per_image=64, log_every=1, checkpoint_every=4, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def quiet(_: str) -> None:
    pass


def test_loss_falls_and_model_round_trips(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=40)
    out = train_local(cfg, log=quiet)
    losses = [r["loss"] for r in out["history"]]
    assert out["step"] == 40 and len(losses) == 40
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])
    model = ifcn.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    trained = load_state(cfg)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k])
    assert model.config == ifcn.ModelConfig(backbone="vgg16_narrow")
    for f in ("loss.csv", "loss.png", "checkpoint.pt"):
        assert (tmp_path / "run" / f).stat().st_size > 0
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["step", "loss", "objectness", "mask"] and len(rows) == 41


def test_resume_continues_where_it_stopped(tiny_data, tmp_path):
    logs: list[str] = []
    first = train_local(tiny_config(tiny_data, tmp_path / "a", max_steps=6), log=logs.append)
    again = train_local(tiny_config(tiny_data, tmp_path / "a", max_steps=10), log=logs.append)
    assert first["step"] == 6 and again["step"] == 10
    assert any("resuming" in s and "step 6" in s for s in logs)
    assert [r["step"] for r in again["history"]] == list(range(1, 11))
    straight = train_local(tiny_config(tiny_data, tmp_path / "b", max_steps=10), log=quiet)
    resumed = ifcn.load_checkpoint(str(tmp_path / "a" / "model.pt")).state_dict()
    for k, v in ifcn.load_checkpoint(str(tmp_path / "b" / "model.pt")).state_dict().items():
        torch.testing.assert_close(resumed[k], v, msg=f"resumed run differs from a straight run at {k}")
    assert [r["loss"] for r in again["history"]] == pytest.approx([r["loss"] for r in straight["history"]], rel=1e-4)


def test_output_on_s3_checkpoints_and_resumes(tiny_data, s3_bucket):
    out = s3_bucket + "/run"
    train_local(tiny_config(tiny_data, out, max_steps=2), log=quiet)
    logs: list[str] = []
    again = train_local(tiny_config(tiny_data, out, max_steps=3), log=logs.append)
    assert again["step"] == 3 and any("resuming" in s for s in logs)
    model = ifcn.load_checkpoint(out + "/model.pt")
    assert model.config.backbone == "vgg16_narrow"


def test_resume_refuses_another_model(tiny_data, tmp_path):
    train_local(tiny_config(tiny_data, tmp_path, max_steps=1), log=quiet)
    with pytest.raises(ValueError, match="fcn-baseline.*another --output"):
        train_local(tiny_config(tiny_data, tmp_path, max_steps=2, model="fcn-baseline"), log=quiet)


def test_time_limit_stops_and_saves(tiny_data, tmp_path):
    out = train_local(tiny_config(tiny_data, tmp_path, max_minutes=0.0), log=quiet)
    assert out["step"] == 0 and (tmp_path / "model.pt").exists()


def test_lr_schedule_paper_defaults_and_narrow_warmup():
    paper = TrainConfig("i", "a", "o")
    assert (paper.learning_rate, paper.warmup, paper.steps, paper.lr_step) == (0.001, 0, 40000, 32000)
    assert paper.lr_at(0) == 0.001 and paper.lr_at(31999) == 0.001 and paper.lr_at(32000) == pytest.approx(1e-4)
    narrow = TrainConfig("i", "a", "o", backbone="vgg16_narrow")
    assert narrow.lr_at(narrow.warmup - 1) == narrow.learning_rate > narrow.lr_at(0) > 0
    with pytest.raises(ValueError, match="model"):
        TrainConfig("i", "a", "o", model="maskrcnn")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], capture_output=True, text=True, timeout=120)


def test_cli_wrong_flag_is_a_one_line_usage_error():
    r = run_cli("--images", "x", "--annotations", "y", "--output", "z", "--backbone", "resnet")
    assert r.returncode == 2 and "invalid choice: 'resnet'" in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_files_are_one_line_errors(tiny_data, tmp_path):
    r = run_cli("--images", str(tiny_data / "images"), "--annotations", str(tmp_path / "missing.json"),
                "--output", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: annotations {tmp_path / 'missing.json'}: no such file; "
                                             f"pass the COCO JSON with --annotations"]
    r = run_cli("--images", str(tmp_path), "--annotations", str(tiny_data / "annotations.json"),
                "--output", str(tmp_path / "o"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--images" in r.stderr


@pytest.mark.slow
def test_ray_train_two_workers_ddp_writes_a_loadable_model(tiny_data, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        url = train(tiny_config(tiny_data, tmp_path, max_steps=3, num_workers=2), log=quiet)
    finally:
        ray.shutdown()
    assert url == str(tmp_path / "model.pt")
    state = load_state(tiny_config(tiny_data, tmp_path))
    assert state["step"] == 3
    model = ifcn.load_checkpoint(url)
    out = ifcn.Predictor(model, ifcn.InferenceConfig(scales=(160,), windows_per_scale=5), device="cpu").predict(
        np.zeros((64, 64, 3), np.uint8))
    assert isinstance(out, list)


# ---- baseline -------------------------------------------------------------------------------------------


def test_connected_components_hand_case():
    m = torch.zeros(6, 7, dtype=torch.bool)
    m[0:2, 0:2] = True  # component A
    m[2, 2] = True  # diagonal to A: 4-connectivity keeps it apart
    m[4:6, 1:6] = True  # component C, a bar
    m[3, 5] = True  # ... with a bump
    labels, n = baseline.connected_components(m)
    assert n == 3
    assert (labels[~m] == 0).all()
    groups = {tuple(sorted(map(tuple, torch.nonzero(labels == i).tolist()))) for i in range(1, n + 1)}
    assert groups == {((0, 0), (0, 1), (1, 0), (1, 1)), ((2, 2),),
                      tuple(sorted([(4, c) for c in range(1, 6)] + [(5, c) for c in range(1, 6)] + [(3, 5)]))}
    assert baseline.connected_components(torch.ones(3, 3, dtype=torch.bool))[1] == 1
    assert baseline.connected_components(torch.zeros(3, 3, dtype=torch.bool))[1] == 0


def test_baseline_predict_one_proposal_per_component(monkeypatch):
    prob = torch.zeros(20, 30)
    prob[2:8, 3:9] = 0.9
    prob[10:18, 20:28] = 0.7
    monkeypatch.setattr(baseline, "foreground_probability", lambda model, image, config: prob)
    props = baseline.predict(baseline.FCNBaseline(ifcn.ModelConfig(backbone="vgg16_narrow")),
                             np.zeros((20, 30, 3), np.uint8), ifcn.InferenceConfig(scales=(32,)))
    assert [round(p["score"], 4) for p in props] == [0.9, 0.7]
    assert props[0]["bbox"] == [3.0, 2.0, 6.0, 6.0] and props[0]["area"] == 36
    assert props[1]["rle"]["size"] == [20, 30] and isinstance(props[1]["rle"]["counts"], str)
    assert mask_utils.decode(props[1]["rle"])[10:18, 20:28].all()


def test_baseline_trains_with_the_same_loop_and_round_trips(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, max_steps=25, model="fcn-baseline")
    out = train_local(cfg, log=quiet)
    losses = [r["loss"] for r in out["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    model = baseline.load_baseline(str(tmp_path / "model.pt"))
    props = baseline.predict(model, np.zeros((64, 64, 3), np.uint8), ifcn.InferenceConfig(scales=(160,)))
    assert all(set(p) == {"score", "rle", "bbox", "area", "scale"} for p in props)
    ifcn.save_checkpoint(ifcn.InstanceFCN(ifcn.ModelConfig(backbone="vgg16_narrow")), str(tmp_path / "ifcn.pt"))
    with pytest.raises(ValueError, match="not an fcn-baseline checkpoint"):
        baseline.load_baseline(str(tmp_path / "ifcn.pt"))
