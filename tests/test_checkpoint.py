"""Checkpoints: round trip through local paths and file:// URLs, digest, clear errors.

Run: pytest tests/test_checkpoint.py -q
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from ifcn import InstanceFCN, ModelConfig, checkpoint_digest, load_checkpoint, save_checkpoint
from ifcn.models.checkpoint import read_checkpoint


def _model(seed: int) -> InstanceFCN:
    torch.manual_seed(seed)
    model = InstanceFCN(ModelConfig("vgg16_narrow", k=3, m=9))
    # non-default batch-norm statistics so buffers are checked too
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("as_url", [False, True])
def test_round_trip(tmp_path, as_url: bool) -> None:
    model = _model(0)
    path = tmp_path / "nested" / "dir" / "model.pt"  # parents are created
    url = f"file://{path}" if as_url else str(path)
    save_checkpoint(model, url, extra={"step": 7, "note": "x"})
    loaded = load_checkpoint(url)
    assert loaded.config == model.config
    assert not loaded.training
    want = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert read_checkpoint(url)["extra"] == {"step": 7, "note": "x"}
    assert not (path.parent / "model.pt.tmp").exists()  # written to a temp file, then moved
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_digest_is_sha256_of_file(tmp_path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(_model(0), str(path))
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_digest(str(path)) == want
    assert checkpoint_digest(f"file://{path}") == want
    save_checkpoint(_model(1), str(tmp_path / "other.pt"))
    assert checkpoint_digest(str(tmp_path / "other.pt")) != want


@pytest.mark.parametrize("load", ["load_checkpoint", "checkpoint_header"])
def test_wrong_files_raise_clear_errors(tmp_path, load: str) -> None:
    """The model loader and the driver's torch-free header reader refuse bad files alike."""
    from ifcn.models.checkpoint_header import checkpoint_header

    load = {"load_checkpoint": load_checkpoint, "checkpoint_header": checkpoint_header}[load]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="garbage.pt: not a readable torch file"):
        load(str(garbage))
    state_only = tmp_path / "state_only.pt"
    torch.save(_model(0).state_dict(), state_only)  # weights without the checkpoint envelope
    with pytest.raises(ValueError, match="not an InstanceFCN checkpoint.*save_checkpoint"):
        load(f"file://{state_only}")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(str(tmp_path / "absent.pt"))


def test_baseline_checkpoint_is_refused_by_name(tmp_path) -> None:
    from ifcn.models.baseline import FCNBaseline
    from ifcn.models.checkpoint import save_baseline

    url = str(tmp_path / "baseline.pt")
    save_baseline(FCNBaseline(ModelConfig(backbone="vgg16_narrow")), url)
    with pytest.raises(ValueError, match="'fcn-baseline' model, not InstanceFCN.*load_baseline"):
        load_checkpoint(url)


def test_header_reads_the_config_and_digest_without_tensors(tmp_path) -> None:
    """checkpoint_header (torch-free, for the driver) gives read_checkpoint's payload but the
    tensors, and the file's sha256, from one read."""
    from ifcn.models.checkpoint_header import checkpoint_header

    path = tmp_path / "m.pt"
    save_checkpoint(_model(0), str(path), extra={"step": 7})
    sha, header = checkpoint_header(f"file://{path}")
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    payload = read_checkpoint(str(path))
    assert {k: v for k, v in header.items() if k != "state_dict"} == \
        {k: v for k, v in payload.items() if k != "state_dict"}
    assert header["config"]["backbone"] == "vgg16_narrow" and header["extra"] == {"step": 7}
    assert list(header["state_dict"]) == list(payload["state_dict"])
    assert all(v is None for v in header["state_dict"].values())  # no tensor was read


def test_header_refuses_what_the_pipeline_cannot_run(tmp_path) -> None:
    import pickle
    import zipfile

    from ifcn.models.baseline import FCNBaseline
    from ifcn.models.checkpoint import save_baseline
    from ifcn.models.checkpoint_header import checkpoint_header

    baseline = tmp_path / "baseline.pt"
    save_baseline(FCNBaseline(ModelConfig(backbone="vgg16_narrow")), str(baseline))
    with pytest.raises(ValueError, match="holds a 'fcn-baseline' model"):
        checkpoint_header(str(baseline))
    evil = tmp_path / "evil.pt"  # a pickled call outside torch is refused, never run
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(print))
    with pytest.raises(ValueError, match="builtins.print is not allowed"):
        checkpoint_header(str(evil))
