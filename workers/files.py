"""Files in the artifact store and beside it: atomic local writes, fsspec URLs (s3://... in a cluster), and a
local copy of a remote file for readers that need a path."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_url(url: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a local path (atomically) or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if isinstance(fs, LocalFileSystem):
        write_atomic(path, data)
    else:
        fs.pipe_file(path, data)


def is_url(path: str | os.PathLike) -> bool:
    """An fsspec URL (s3://..., memory://...), not a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_copy(url: str) -> Path:
    """A local path for the file at `url`: the path itself for a local file, else a copy fetched once into
    a cache folder ($LADLE_CACHE, default the system's temp folder), keyed by the URL (an upload's URL never
    names other bytes: a new upload gets a new id)."""
    if not is_url(url):
        return Path(str(url).removeprefix("file://"))
    cache = Path(os.environ.get("LADLE_CACHE") or tempfile.gettempdir()) / "ladle-cache"
    target = cache / hashlib.sha256(url.encode()).hexdigest()[:32] / url.rstrip("/").rsplit("/", 1)[-1]
    if not target.is_file():
        with fsspec.open(url, "rb") as f:
            write_atomic(target, f.read())
    return target
