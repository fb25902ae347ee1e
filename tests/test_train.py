"""Training loop (loss falls, checkpoints round-trip, resume), jobs.train CLI, Ray Train, baseline."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import ifcn
from ifcn.models import baseline
from ifcn.data import SynthConfig, write_synthetic_dataset
from ifcn.train import TrainConfig, train_local
from ifcn.models.checkpoint import read_checkpoint
from ifcn.train.data import StepDataset
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
    """Also validation while training: AR rows, columns in loss.csv, best.pt = the best validated weights."""
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=40, val_images=str(tiny_data / "images"),
                      val_annotations=str(tiny_data / "annotations.json"), val_every=15, val_max_images=2)
    logs: list[str] = []
    out = train_local(cfg, log=logs.append)
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
    # validation at 15, 30 and the last step; the AR columns are empty on the other rows
    val = out["validation"]
    assert [v["step"] for v in val] == [15, 30, 40] and len([s for s in logs if s.startswith("validation")]) == 3
    header = rows[0].split(",")
    col = header.index("val_AR@100")
    cells = {int(r.split(",")[0]): r.split(",")[col] for r in rows[1:]}
    assert {k for k, v in cells.items() if v} == {15, 30, 40}
    assert float(cells[40]) == pytest.approx(val[-1]["AR@100"], abs=1e-5)
    # best.pt holds the best-validated weights: jobs.evaluate on it (its own load + predict path) agrees
    from jobs.evaluate import evaluate

    best = max(val, key=lambda v: v["AR@100"])  # first of equals: ties keep the earlier checkpoint
    assert best["AR@100"] > 0.05, val
    report = evaluate(str(tiny_data / "annotations.json"), checkpoint=str(tmp_path / "run" / "best.pt"),
                      images=str(tiny_data / "images"), scales=(160,), limit=2, progress=False, device="cpu")
    assert report["metrics"]["AR@100"] == pytest.approx(best["AR@100"], abs=1e-9)
    assert read_checkpoint(str(tmp_path / "run" / "best.pt"))["extra"]["step"] == best["step"]


def test_resume_continues_where_it_stopped(tiny_data, tmp_path):
    """Also: prefetching data workers (resumed run) give exactly what in-step loading does (straight run)."""
    logs: list[str] = []
    first = train_local(tiny_config(tiny_data, tmp_path / "a", max_steps=6, data_workers=2), log=logs.append)
    again = train_local(tiny_config(tiny_data, tmp_path / "a", max_steps=10, data_workers=1, prefetch=3),
                        log=logs.append)
    assert first["step"] == 6 and again["step"] == 10
    assert any("resuming" in s and "step 6" in s for s in logs)
    assert [r["step"] for r in again["history"]] == list(range(1, 11))
    straight = train_local(tiny_config(tiny_data, tmp_path / "b", max_steps=10, data_workers=0), log=quiet)
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


def test_lr_schedule_paper_preset_and_narrow_warmup():
    paper = TrainConfig("i", "a", "o", preset="paper")
    assert (paper.learning_rate, paper.warmup, paper.steps, paper.lr_step) == (0.001, 0, 40000, 32000)
    assert (paper.backbone, paper.scales, paper.momentum, paper.weight_decay) == \
        ("vgg16", (119, 178, 267, 400, 600, 900), 0.9, 5e-4)
    assert paper.max_size == ifcn.InferenceConfig().max_size == 2000  # the 900 px scale of a 4:3 image fits
    assert paper.lr_at(0) == 0.001 and paper.lr_at(31999) == 0.001 and paper.lr_at(32000) == pytest.approx(1e-4)
    narrow = TrainConfig("i", "a", "o", backbone="vgg16_narrow")
    assert narrow.lr_at(narrow.warmup - 1) == narrow.learning_rate > narrow.lr_at(0) > 0
    with pytest.raises(ValueError, match="model"):
        TrainConfig("i", "a", "o", model="maskrcnn")
    with pytest.raises(ValueError, match="preset='huge'.*paper"):
        TrainConfig("i", "a", "o", preset="huge")


def test_small_preset_is_the_default_and_explicit_fields_win():
    small = TrainConfig("i", "a", "o")
    assert (small.preset, small.backbone, small.scales, small.steps, small.lr_step) == \
        ("small", "vgg16_narrow", (192, 256, 320, 384), 2000, 1600)
    assert (small.learning_rate, small.warmup) == (0.02, 100)
    mixed = TrainConfig("i", "a", "o", preset="paper", backbone="vgg16_narrow", steps=10)
    assert (mixed.backbone, mixed.steps, mixed.lr_step, mixed.learning_rate) == ("vgg16_narrow", 10, 32000, 0.02)
    assert TrainConfig.from_dict(mixed.to_dict()) == mixed


def test_time_budget_moves_warmup_and_lr_drop():
    # 10 minutes, 2000 steps, drop at 1600 (80%), warm-up 100 steps (5%): by time when steps lag behind.
    cfg = TrainConfig("i", "a", "o", lr=0.02, steps=2000, lr_step=1600, warmup_steps=100, max_minutes=10)
    assert cfg.lr_at(300, elapsed_s=0.79 * 600) == 0.02
    assert cfg.lr_at(300, elapsed_s=0.80 * 600) == pytest.approx(0.002)  # 300 steps done, but 80% of the time
    assert cfg.lr_at(1600, elapsed_s=1.0) == pytest.approx(0.002)  # steps ahead of the clock: steps decide
    assert cfg.lr_at(0, elapsed_s=0.0) == pytest.approx(0.02 * 1 / 100)
    assert cfg.lr_at(0, elapsed_s=0.025 * 600) == pytest.approx(0.02 * 51 / 100)  # 2.5% of 2000 = step 50
    assert cfg.lr_at(10, elapsed_s=0.05 * 600) == 0.02
    untimed = TrainConfig("i", "a", "o", lr=0.02, steps=2000, lr_step=1600, warmup_steps=100)
    assert untimed.lr_at(300, elapsed_s=1e9) == 0.02  # without a budget time never counts


def test_run_stopped_by_time_has_decayed_lr_and_resume_spends_the_same_budget(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, steps=100000, lr_step=80000, warmup_steps=0, max_minutes=0.1)
    logs: list[str] = []
    out = train_local(cfg, log=logs.append)
    lrs = [r["lr"] for r in out["history"]]
    assert 2 < out["step"] < 100000 and any("time limit" in s for s in logs)
    assert lrs[0] == 0.02 and lrs[-1] == pytest.approx(0.002)  # dropped at 80% of 6 s, not at step 80000
    assert out["history"][-1]["elapsed_s"] == pytest.approx(6.0, abs=1.2)
    again = train_local(cfg, log=logs.append)  # the budget covers resumed runs too: nothing left to train
    assert again["step"] == out["step"] and logs[-2].startswith("time limit")


def test_bf16_autocast_reaches_the_forward(tiny_data, tmp_path, monkeypatch):
    """--amp bf16: the model's convolutions run in bfloat16 (CPU autocast here; the same code path as CUDA)."""
    from ifcn.train import loop

    dtypes: list[torch.dtype] = []
    build = loop.build_model

    def spying_build(config):
        model = build(config)
        model.register_forward_hook(lambda m, i, o: dtypes.append((o[0] if isinstance(o, tuple) else o).dtype))
        return model

    monkeypatch.setattr(loop, "build_model", spying_build)
    out = train_local(tiny_config(tiny_data, tmp_path / "bf16", max_steps=3, amp="bf16"), log=quiet)
    assert dtypes == [torch.bfloat16] * 3 and np.isfinite([r["loss"] for r in out["history"]]).all()
    dtypes.clear()
    train_local(tiny_config(tiny_data, tmp_path / "fp32", max_steps=1), log=quiet)
    assert dtypes == [torch.float32]
    with pytest.raises(ValueError, match="amp='fp16'"):
        tiny_config(tiny_data, tmp_path, amp="fp16")


def test_step_dataset_gives_every_image_once_per_epoch_across_ranks(tiny_data):
    ds = ifcn.data.CocoDataset(str(tiny_data / "images"), str(tiny_data / "annotations.json"))
    ids = {img["id"] for img in ds.images}
    world = 2
    ranks = [StepDataset(ds, 3, 7, rank, world, 0, (160,), 2000, True) for rank in range(world)]
    items = [[r[i] for i in range(len(r))] for r in ranks]
    assert [it.step for it in items[0]] == [3, 4, 5, 6]
    for step in range(4):  # 2 images, 2 ranks: each step's pair is one whole epoch
        assert {items[0][step].image_id, items[1][step].image_id} == ids
    # the same (step, rank) is the same example wherever it is made
    again = ranks[1][2]
    torch.testing.assert_close(again.example.image, items[1][2].example.image, rtol=0, atol=0)
    assert again.generator_seed == items[1][2].generator_seed != items[0][2].generator_seed


def test_cli_forwards_only_given_flags():
    from jobs.train import config_from_args, parse_args

    base = ["--images", "i", "--annotations", "a", "--output", "o"]
    assert config_from_args(parse_args(base)) == TrainConfig("i", "a", "o")
    paper = config_from_args(parse_args(base + ["--preset", "paper", "--amp", "bf16", "--no-flip", "--scales", "600"]))
    assert paper == TrainConfig("i", "a", "o", preset="paper", amp="bf16", flip=False, scales=(600,))
    assert (paper.backbone, paper.steps, paper.max_size) == ("vgg16", 40000, 2000)


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


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


# What a training run may print: progress with ETA, validation, the saved model. Anything else (Ray's own
# logging, warnings) is noise the job must not show.
ALLOWED_LINES = re.compile(r"(step \d+/\d+ loss [\d.]+ \(.*\) lr \S+ [\d.]+ it/s ETA \d+m\d\ds"
                           r"|validation step \d+: AR@10 [\d.]+ AR@100 [\d.]+ on \d+ images .*"
                           r"|saved \S+/model\.pt at step \d+|model: \S+/model\.pt)")


@pytest.mark.slow
def test_cli_two_workers_prints_only_progress_and_ddp_keeps_ranks_in_sync(tiny_data, tmp_path):
    """jobs.train on a local Ray, 2 Ray Train workers (DDP, gloo): the output is progress and validation
    lines only; both ranks end with bit-identical parameters, having trained on different images."""
    data = ["--images", str(tiny_data / "images"), "--annotations", str(tiny_data / "annotations.json")]
    r = run_cli(*data, "--output", str(tmp_path), "--scales", "160", "--steps", "6", "--lr-step", "4",
                "--warmup-steps", "2", "--windows-per-image", "64", "--num-workers", "2", "--log-every", "2",
                "--val-images", str(tiny_data / "images"), "--val-annotations", str(tiny_data / "annotations.json"),
                "--val-every", "3", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines() + r.stderr.splitlines()
    assert [ln for ln in lines if not ALLOWED_LINES.fullmatch(ln)] == []
    assert [ln.split(" loss")[0] for ln in lines if ln.startswith("step ")] == ["step 2/6", "step 4/6", "step 6/6"]
    assert [ln.split(":")[0] for ln in lines if ln.startswith("validation")] == ["validation step 3", "validation step 6"]
    assert len(lines) == 7

    ranks = [json.loads((tmp_path / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert [(rk["rank"], rk["world"]) for rk in ranks] == [(0, 2), (1, 2)]
    assert [s for s, _ in ranks[0]["steps"]] == [s for s, _ in ranks[1]["steps"]] == list(range(6))
    assert all(a[1] != b[1] for a, b in zip(ranks[0]["steps"], ranks[1]["steps"])), ranks
    model = ifcn.load_checkpoint(str(tmp_path / "model.pt"))
    saved = {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"] == saved
    torch.manual_seed(0)
    init = {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
            for n, p in ifcn.InstanceFCN(model.config).named_parameters()}
    assert sum(init[n] != saved[n] for n in saved) == len(saved)  # every parameter moved: the ranks trained


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
    model = ifcn.load_baseline(str(tmp_path / "model.pt"))
    props = baseline.predict(model, np.zeros((64, 64, 3), np.uint8), ifcn.InferenceConfig(scales=(160,)))
    assert all(set(p) == {"score", "rle", "bbox", "area", "scale"} for p in props)
    ifcn.save_checkpoint(ifcn.InstanceFCN(ifcn.ModelConfig(backbone="vgg16_narrow")), str(tmp_path / "ifcn.pt"))
    with pytest.raises(ValueError, match="not an fcn-baseline checkpoint"):
        ifcn.load_baseline(str(tmp_path / "ifcn.pt"))


def test_cli_ctrl_c_is_one_line_exit_130_and_a_rerun_resumes(tiny_data, tmp_path, ray_head):
    """SIGINT to the job's process group (a terminal's Ctrl-C, data processes included): one line, exit
    130, no traceback; the same command then resumes from the last checkpoint, here on a running
    cluster (RAY_ADDRESS, as under `ray job submit`: Ray refuses num_cpus there)."""
    import os
    import signal

    args = ["--images", str(tiny_data / "images"), "--annotations", str(tiny_data / "annotations.json"),
            "--output", str(tmp_path / "o"), "--backbone", "vgg16_narrow", "--scales", "160", "--steps", "400",
            "--windows-per-image", "16", "--checkpoint-every", "2", "--log-every", "1", "--data-workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args, "--max-steps", "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # interrupt once a checkpoint has been written (steps 2, 4, ... are saved)
        if line.startswith("step 5/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("ifcn-train: interrupted; re-running the same command resumes")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    again = run_cli(*args, "--max-steps", "16",
                    env={**os.environ, **ray_head.client_env, "RAY_ADDRESS": ray_head.gcs_address})
    assert again.returncode == 0, again.stderr
    step = int(re.search(r"resuming from \S+ at step (\d+)", again.stdout).group(1))
    assert 4 <= step < 16  # from a checkpoint the interrupted run wrote, not from scratch
    assert "saved" in again.stdout and "at step 16" in again.stdout
