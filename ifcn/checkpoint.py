"""One file per model: config + weights, readable from any fsspec URL."""
from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from .config import ModelConfig
from .io import open_url, write_bytes
from .model import InstanceFCN

FORMAT = "instancefcn-checkpoint/1"


def save_checkpoint(model: InstanceFCN, url: str, extra: dict[str, Any] | None = None,
                    storage_options: dict | None = None) -> None:
    """Writes {format, config, state_dict, extra} atomically (temp file, then move) to `url`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "config": model.config.to_dict(), "state_dict": state, "extra": extra or {}}
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
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {url}: not an InstanceFCN checkpoint (expected format {FORMAT!r}); "
                         f"write one with ifcn.save_checkpoint or jobs.train")
    return payload


def load_checkpoint(url: str, storage_options: dict | None = None, expected_sha256: str | None = None) -> InstanceFCN:
    """InstanceFCN with config and weights from `url`, in eval mode on CPU (see read_checkpoint)."""
    payload = read_checkpoint(url, storage_options, expected_sha256)
    kind = payload.get("extra", {}).get("model", "instancefcn")
    if kind != "instancefcn":
        raise ValueError(f"checkpoint {url}: holds a {kind!r} model, not InstanceFCN; load it with "
                         f"ifcn.baseline.load_baseline (or train InstanceFCN with jobs.train)")
    model = InstanceFCN(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def checkpoint_digest(url: str, storage_options: dict | None = None) -> str:
    """sha256 of the checkpoint file's bytes: stamps outputs with the exact weights used."""
    h = hashlib.sha256()
    with open_url(url, "rb", storage_options) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
