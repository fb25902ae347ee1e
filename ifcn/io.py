"""fsspec helpers: one place that turns a URL into a file or filesystem."""
from __future__ import annotations

import uuid
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
    """Writes `data` to `url` atomically (see `put_atomic`), creating parent folders."""
    fs, path = filesystem(url, storage_options)
    put_atomic(fs, path, data)


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """The project's one way to write a file so that no reader (or resumed run) sees half of it.

    Object stores (S3, GCS, Azure) make an object visible only when its upload completes, so the
    bytes go straight to `path`: a move there is a copy plus a delete, twice the traffic for
    nothing. Filesystems with rename get a hidden temp file beside the target, renamed over it
    (atomic within one folder); globs such as `masks/*.parquet` never match the temp name.
    """
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not has_atomic_rename(fs):
        fs.pipe_file(path, data)
        return
    name = path.rsplit("/", 1)[-1]
    tmp = f"{parent + '/' if parent else ''}.{name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def has_atomic_rename(fs: fsspec.AbstractFileSystem) -> bool:
    """Local (and other POSIX-like) filesystems rename atomically; object stores do not."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def is_temp_name(name: str) -> bool:
    """A `put_atomic` temp file left by a killed writer (safe to delete when no run is live)."""
    return name.startswith(".") and name.endswith(".tmp")
