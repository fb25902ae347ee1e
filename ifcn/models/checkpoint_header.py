"""What a checkpoint file says about itself (format, kind, config), and its sha256, read without torch.

The job's driver plans with this: importing torch costs it ~490 MiB of RSS, and building a model
only to read its config is the workers' job (they load the weights the driver's sha256 names).
A checkpoint is torch's zip format; its `data.pkl` is unpickled here with every torch global
replaced by a stub and every tensor storage by None, so no tensor is read and no pickled code
runs (a global outside torch and OrderedDict is refused, as torch's weights_only loader does).
"""
from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

from ifcn.io import open_url

FORMAT = "instancefcn-checkpoint/1"
DEFAULT_KIND = "instancefcn"  # checkpoints written before kinds were stored hold InstanceFCN
# Kinds whose models ifcn.Predictor (and so the pipeline) runs: ifcn.models.registry' windowed entries
# (tests/test_registry.py holds the two equal).
WINDOWED_KINDS = frozenset({"instancefcn", "deepmask"})


def checkpoint_kind(payload: dict[str, Any]) -> str:
    """The model kind a checkpoint payload (or header) holds."""
    return payload.get("kind") or payload.get("extra", {}).get("model") or DEFAULT_KIND


def check_format(payload: Any, url: str) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {url}: not an InstanceFCN checkpoint (expected format {FORMAT!r}); "
                         f"write one with ifcn.save_checkpoint or jobs.train")
    return payload


class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _stub
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint")

    def persistent_load(self, pid: Any) -> None:
        return None  # a tensor's storage: not read


def _stub(*args: Any, **kwargs: Any) -> None:
    return None


def read_header(data: bytes, url: str) -> dict[str, Any]:
    """The checkpoint payload of `data` (a file's bytes) with every tensor as None."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            payload = _HeaderUnpickler(io.BytesIO(z.read(name))).load()
    except Exception as e:  # not a zip, no data.pkl, a refused global, a truncated pickle
        raise ValueError(f"checkpoint {url}: not a readable torch file ({type(e).__name__}: {e})") from e
    return check_format(payload, url)


def checkpoint_header(url: str, storage_options: dict | None = None) -> tuple[str, dict[str, Any]]:
    """(sha256 of the file's bytes, its header: format, kind, config, extra) from one read.
    Raises ValueError naming the file for anything the pipeline cannot run."""
    with open_url(url, "rb", storage_options) as f:
        data = f.read()
    header = read_header(data, url)
    kind = checkpoint_kind(header)
    if kind not in WINDOWED_KINDS:
        raise not_windowed(url, kind)
    return hashlib.sha256(data).hexdigest(), header


def not_windowed(url: str, kind: str) -> ValueError:
    """The error for a checkpoint whose model ifcn.Predictor does not run (e.g. the FCN baseline)."""
    return ValueError(f"checkpoint {url}: holds a {kind!r} model, not InstanceFCN or another model that "
                      f"ifcn.Predictor runs ({sorted(WINDOWED_KINDS)}); load it with ifcn.load_baseline "
                      f"or ifcn.models.checkpoint.load_model")
