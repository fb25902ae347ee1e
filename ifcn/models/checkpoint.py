"""One file per model: config, weights and the model's kind, readable from any fsspec URL.

The kind names the model's entry in ifcn.models.registry (instancefcn, deepmask, fcn-baseline); loading
builds that entry's module. Files written before kinds were stored hold InstanceFCN (or carry the
kind in extra["model"], as jobs.train wrote it).
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

import torch
from torch import nn

from ifcn.config import ModelConfig
from ifcn.io import open_url, write_bytes
from ifcn.models import registry as models

from .baseline import MODEL_NAME as BASELINE, FCNBaseline
from .checkpoint_header import FORMAT, check_format, checkpoint_kind, not_windowed


def save_checkpoint(model: nn.Module, url: str, extra: dict[str, Any] | None = None,
                    storage_options: dict | None = None) -> None:
    """Writes {format, kind, config, state_dict, extra} atomically (temp file, then move) to `url`;
    `model` is any registered model (ifcn.models.registry), its kind comes from its class."""
    kind = models.kind_of(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "kind": kind, "config": model.config.to_dict(), "state_dict": state,
               "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(url, buf.getvalue(), storage_options)


def read_checkpoint(url: str, storage_options: dict | None = None, expected_sha256: str | None = None) -> dict[str, Any]:
    """The raw payload, loaded with weights_only=True (no pickled code runs).

    expected_sha256: refuse bytes that hash otherwise (a job's workers load the weights it planned)."""
    with open_url(url, "rb", storage_options) as f:
        data = f.read()
    if expected_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise ValueError(f"checkpoint {url}: its sha256 is {got[:12]}..., but the job planned {expected_sha256[:12]}... "
                             f"(the file changed after the job started); re-run to use the new file, or restore the old one")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise ValueError(f"checkpoint {url}: not a readable torch file ({type(e).__name__}: {e})") from e
    return check_format(payload, url)


def load_model(url: str, storage_options: dict | None = None, expected_sha256: str | None = None
               ) -> tuple[nn.Module, models.ModelSpec]:
    """Any registered model from `url`, built by its kind, in eval mode on CPU, with its spec
    (ifcn.inference.predictor.predictor_for runs it over images; see read_checkpoint for the arguments)."""
    payload = read_checkpoint(url, storage_options, expected_sha256)
    spec = models.for_kind(checkpoint_kind(payload), f"checkpoint {url}")
    return _build(url, payload, spec), spec


def load_checkpoint(url: str, storage_options: dict | None = None, expected_sha256: str | None = None) -> nn.Module:
    """A model that ifcn.Predictor (and the pipeline) runs, InstanceFCN or DeepMask, with config and
    weights from `url`, in eval mode on CPU (see read_checkpoint)."""
    payload = read_checkpoint(url, storage_options, expected_sha256)
    kind = checkpoint_kind(payload)
    spec = models.for_kind(kind, f"checkpoint {url}")
    if not spec.windowed:
        raise not_windowed(url, kind)
    return _build(url, payload, spec)


def _build(url: str, payload: dict[str, Any], spec: models.ModelSpec) -> nn.Module:
    model = spec.build(ModelConfig.from_dict(payload["config"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:  # torch lists every key; the first lines say enough
        first = str(e).splitlines()[:2]
        raise ValueError(f"checkpoint {url}: its weights do not fit a {spec.kind!r} model ({' '.join(first)[:300]}); "
                         f"was it written by another version?") from e
    return model.eval()


def checkpoint_digest(url: str, storage_options: dict | None = None) -> str:
    """sha256 of the checkpoint file's bytes: stamps outputs with the exact weights used."""
    h = hashlib.sha256()
    with open_url(url, "rb", storage_options) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_baseline(model: FCNBaseline, url: str, extra: dict | None = None, storage_options: dict | None = None) -> None:
    """A one-map FCN baseline's checkpoint (what jobs.train --model fcn-baseline writes)."""
    save_checkpoint(model, url, extra={"model": BASELINE, **(extra or {})}, storage_options=storage_options)


def load_baseline(url: str, storage_options: dict | None = None) -> FCNBaseline:
    """FCNBaseline from a checkpoint written by jobs.train --model fcn-baseline, in eval mode."""
    model, spec = load_model(url, storage_options)
    if spec.kind != BASELINE:
        raise ValueError(f"checkpoint {url}: not an {BASELINE} checkpoint (it holds a {spec.kind!r} model; load "
                         f"it with ifcn.models.checkpoint.load_model, or ifcn.load_checkpoint for InstanceFCN)")
    return model
