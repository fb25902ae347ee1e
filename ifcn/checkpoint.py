"""One file per model: config + weights, readable from any fsspec URL."""
from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from .config import ModelConfig
from .io import filesystem, open_url
from .model import InstanceFCN

FORMAT = "instancefcn-checkpoint/1"


def save_checkpoint(model: InstanceFCN, url: str, extra: dict[str, Any] | None = None,
                    storage_options: dict | None = None) -> None:
    """Writes {format, config, state_dict, extra} atomically (temp file, then move) to `url`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "config": model.config.to_dict(), "state_dict": state, "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, path)


def read_checkpoint(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The raw payload, loaded with weights_only=True (no pickled code runs)."""
    with open_url(url, "rb", storage_options) as f:
        try:
            payload = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad file
            raise ValueError(f"checkpoint {url}: not a readable torch file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {url}: not an InstanceFCN checkpoint (expected format {FORMAT!r}); "
                         f"write one with ifcn.save_checkpoint or jobs.train")
    return payload


def load_checkpoint(url: str, storage_options: dict | None = None) -> InstanceFCN:
    """InstanceFCN with config and weights from `url`, in eval mode on CPU."""
    payload = read_checkpoint(url, storage_options)
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
