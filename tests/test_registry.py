"""The model registry (ifcn.models.registry): lookups, checkpoints by kind, predictors by kind, the shared
window loss against InstanceFCN's own, and no import circle between models and training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import ifcn
from ifcn.models import registry as models
from ifcn import InstanceFCN, ModelConfig
from ifcn.models.baseline import BaselinePredictor, FCNBaseline
from ifcn.models.checkpoint import load_baseline, save_baseline
from ifcn.models.checkpoint import checkpoint_kind, load_checkpoint, load_model, read_checkpoint, save_checkpoint
from ifcn.models.deepmask import DeepMask
from ifcn.inference.predictor import predictor_for
from ifcn.train.loss import loss_for

ROOT = Path(__file__).resolve().parents[1]
NARROW = ModelConfig(backbone="vgg16_narrow", m=9)


def test_names_and_lookups() -> None:
    from ifcn.train.config import MODELS, TrainConfig

    assert models.names() == ("instancefcn", "fcn-baseline", "deepmask") == MODELS
    assert [models.get(n).module for n in MODELS] == [InstanceFCN, FCNBaseline, DeepMask]
    assert [models.get(n).windowed for n in MODELS] == [True, False, True]
    assert models.kind_of(DeepMask(NARROW)) == "deepmask" and models.kind_of(FCNBaseline(NARROW)) == "fcn-baseline"
    with pytest.raises(ValueError, match=r"^model 'maskrcnn': unknown; choose one of \['instancefcn', "
                                         r"'fcn-baseline', 'deepmask'\]$"):
        models.get("maskrcnn")
    with pytest.raises(ValueError, match=r"TrainConfig.model='maskrcnn'"):
        TrainConfig(images="i", annotations="a", output="o", model="maskrcnn")
    with pytest.raises(ValueError, match="Linear: not a registered model"):
        models.kind_of(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["instancefcn", "fcn-baseline", "deepmask"])
def test_checkpoint_round_trip_by_kind(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    model = models.get(name).build(NARROW)
    url = str(tmp_path / f"{name}.pt")
    save_checkpoint(model, url, extra={"step": 3})
    payload = read_checkpoint(url)
    assert checkpoint_kind(payload) == payload["kind"] == name and payload["extra"] == {"step": 3}
    loaded, spec = load_model(url)
    assert type(loaded) is type(model) and spec.kind == name and not loaded.training
    assert loaded.config == NARROW
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_old_checkpoints_load_by_their_extra_model_or_as_instancefcn(tmp_path) -> None:
    """Files written before kinds were stored: jobs.train put the name in extra["model"]; older ones
    hold InstanceFCN. The shipped checkpoint is one of those and loads unchanged."""
    payload = read_checkpoint(str(ROOT / "checkpoints" / "narrow_synth.pt"))
    assert "kind" not in payload and checkpoint_kind(payload) == "instancefcn"
    assert isinstance(load_checkpoint(str(ROOT / "checkpoints" / "narrow_synth.pt")), InstanceFCN)
    base = FCNBaseline(NARROW)
    old = {"format": "instancefcn-checkpoint/1", "config": NARROW.to_dict(), "state_dict": base.state_dict(),
           "extra": {"model": "fcn-baseline"}}
    torch.save(old, tmp_path / "old.pt")
    assert isinstance(load_baseline(str(tmp_path / "old.pt")), FCNBaseline)
    del old["extra"]["model"]
    old["state_dict"] = InstanceFCN(NARROW).state_dict()
    torch.save(old, tmp_path / "older.pt")
    assert isinstance(load_model(str(tmp_path / "older.pt"))[0], InstanceFCN)


def test_unknown_kind_and_wrong_kind_are_one_line_errors(tmp_path) -> None:
    url = tmp_path / "future.pt"
    torch.save({"format": "instancefcn-checkpoint/1", "kind": "maskrcnn", "config": NARROW.to_dict(),
                "state_dict": {}, "extra": {}}, url)
    for load in (load_model, load_checkpoint):
        with pytest.raises(ValueError) as e:
            load(str(url))
        assert "\n" not in str(e.value)
        assert f"checkpoint {url}: holds a model of unknown kind 'maskrcnn'" in str(e.value)
        assert "['instancefcn', 'fcn-baseline', 'deepmask']" in str(e.value)
    dm = str(tmp_path / "dm.pt")
    save_checkpoint(DeepMask(NARROW), dm)
    with pytest.raises(ValueError, match=r"not an fcn-baseline checkpoint \(it holds a 'deepmask' model"):
        load_baseline(dm)
    base = str(tmp_path / "base.pt")
    save_baseline(FCNBaseline(NARROW), base)
    with pytest.raises(ValueError, match=r"'fcn-baseline' model, not InstanceFCN.*load_baseline"):
        load_checkpoint(base)
    wrong = read_checkpoint(dm)
    wrong["kind"] = "instancefcn"
    torch.save(wrong, tmp_path / "mislabelled.pt")
    with pytest.raises(ValueError, match="weights do not fit a 'instancefcn' model"):
        load_model(str(tmp_path / "mislabelled.pt"))


def test_predictor_is_chosen_by_kind() -> None:
    config = ifcn.InferenceConfig(scales=(64,), max_proposals=3)
    for name, cls in (("instancefcn", ifcn.Predictor), ("deepmask", ifcn.Predictor),
                      ("fcn-baseline", BaselinePredictor)):
        predictor = predictor_for(models.get(name).build(NARROW).eval(), config, "cpu")
        assert isinstance(predictor, cls)
        props = predictor.predict(np.zeros((48, 64, 3), np.uint8))
        assert isinstance(props, list) and len(props) <= 3


def test_jobs_evaluate_runs_each_kind_through_its_predictor(tmp_path, monkeypatch) -> None:
    """jobs.evaluate loads by kind: the baseline's proposals are its connected components."""
    from ifcn.models import baseline
    from ifcn.data import SynthConfig, write_synthetic_dataset
    from jobs.evaluate import predict_images

    root = tmp_path / "data"
    gt = write_synthetic_dataset(str(root), 1, seed=5, config=SynthConfig(size=64, min_objects=1, max_objects=2,
                                                                           min_object=0.4, max_object=0.6,
                                                                           min_area=40))
    prob = torch.zeros(64, 64)
    prob[5:20, 5:20] = 0.9
    prob[30:50, 30:60] = 0.8
    monkeypatch.setattr(baseline, "foreground_probability", lambda model, image, config: prob)
    save_baseline(FCNBaseline(NARROW), str(tmp_path / "base.pt"))
    results, ids = predict_images(gt, str(tmp_path / "base.pt"), str(root / "images"), scales=(64,), progress=False)
    boxes = [[int(v) for v in mask_utils.toBbox(r["segmentation"])] for r in results]
    assert ids == [gt["images"][0]["id"]] and boxes == [[5, 5, 15, 15], [30, 30, 30, 20]]
    save_checkpoint(DeepMask(NARROW), str(tmp_path / "dm.pt"))
    results, _ = predict_images(gt, str(tmp_path / "dm.pt"), str(root / "images"), scales=(64,), max_proposals=4,
                                progress=False)
    assert 0 < len(results) <= 4 and json.dumps(results)


def test_registry_instancefcn_loss_equals_the_training_loss_module() -> None:
    """The registry's InstanceFCN loss on a model's real outputs against test_sampling's slow
    per-window reference (and objectness alone without positives)."""
    import torch.nn.functional as F
    from test_sampling import reference_loss

    from ifcn.train.sampling import Example, WindowBatch

    torch.manual_seed(0)
    model = InstanceFCN(ModelConfig(backbone="vgg16_narrow", m=7))
    torch.nn.init.normal_(model.score_head[-1].weight, std=0.3)
    image = torch.randn(1, 3, 48, 56)
    example = Example(image, torch.zeros(0, 48, 56), torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), 48)
    cells = torch.tensor([[1, 1], [3, 4], [5, 6], [0, 2]])
    for positives in (3, 0):
        batch = WindowBatch(cells, (torch.arange(4) < positives).float(), (torch.rand(positives, 7, 7) > 0.4).float())
        loss, parts = loss_for("instancefcn")(model, example, batch, torch.device("cpu"))
        scores, objectness = model(image)
        want = (reference_loss(scores, objectness, batch, 7) if positives else
                F.binary_cross_entropy_with_logits(objectness[0, 0, cells[:, 0], cells[:, 1]], torch.zeros(4)))
        torch.testing.assert_close(loss, want)
        assert parts["objectness"] + parts["mask"] == pytest.approx(float(want), rel=1e-5)
        loss.backward()  # every parameter in the graph, even with no positives (DDP needs that)
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)


def test_no_import_circle_between_models_and_training() -> None:
    """The registry only names models: importing it (and checkpoints, baseline) loads no training
    code and no predictor, and training imports the registry: either order works (one fresh
    interpreter each)."""
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "import ifcn, ifcn.models.baseline as b; assert not hasattr(b, 'train'); "
            "print(sorted(m for m in sys.modules if m.startswith(('ifcn.train', 'ifcn.inference.predictor'))))")
    for first in ("ifcn.models.registry", "ifcn.models.checkpoint", "ifcn.train.sampling"):
        out = subprocess.run([sys.executable, "-c", code, first], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        if not first.startswith("ifcn.train"):
            assert out.stdout.strip() == "[]", (first, out.stdout)


def test_read_and_publish_workers_import_without_torch() -> None:
    """Ray's read and publish tasks run on the cores the inference actors use; importing torch
    there cost ~3 CPU s and ~500 MB per worker and made the job 17% slower on a 2-core machine
    (bench/README.md). Their modules must stay torch-free; `ifcn`'s names still load on use."""
    code = ("import sys; import pipeline.planning.sources, pipeline.stages.sink, pipeline.tables.output, ifcn.io, ifcn.image; "
            "assert 'torch' not in sys.modules, 'torch'; import ifcn; p = ifcn.Predictor; "
            "assert 'torch' in sys.modules and p.__module__ == 'ifcn.inference.predictor'; "
            "from ifcn import encode, PAPER_SCALES; assert PAPER_SCALES[0] == 119; "
            "assert set(ifcn.__all__) <= set(dir(ifcn)); "
            "import pytest\n"
            "with pytest.raises(AttributeError): ifcn.no_such_name")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_windowed_kinds_are_the_registry_s() -> None:
    """The torch-free header reader names the kinds the pipeline runs; they are the registry's."""
    from ifcn.models.checkpoint_header import DEFAULT_KIND, WINDOWED_KINDS

    assert WINDOWED_KINDS == {s.kind for s in models.REGISTRY.values() if s.windowed}
    assert DEFAULT_KIND in models.REGISTRY


def test_a_dry_run_plans_without_torch(tmp_path) -> None:
    """The driver's planning never imports torch (~490 MiB of RSS) nor builds a model: a --dry-run
    with torch made unimportable still reads the checkpoint's sha256 and config."""
    manifest = tmp_path / "m.txt"
    manifest.write_text("s3://bucket/a.jpg\ns3://bucket/b.png\n")
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = ['jobs.segment', '--input', {str(manifest)!r}, '--output', {str(tmp_path / 'out')!r}, "
            f"'--checkpoint', {str(ROOT / 'checkpoints' / 'narrow_synth.pt')!r}, '--dry-run']; "
            "runpy.run_module('jobs.segment', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    said = out.stdout + out.stderr
    assert "2 new" in said and "backbone vgg16_narrow" in said, said[-2000:]
