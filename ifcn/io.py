"""fsspec helpers: one place that turns a URL into a file or filesystem."""
from __future__ import annotations

from typing import IO, Any

import fsspec


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> IO:
    """Opens local paths, file://, s3://, gs://... with clear errors for missing inputs."""
    try:
        return fsspec.open(url, mode, **(storage_options or {})).open()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file") from e


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URL."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Writes `data` to `url`, creating parent folders; a temp file moved over the target means a
    reader (or a resumed run) never sees half a file."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
