"""The artifact store: checkpoints under a local folder (default) or any fsspec URL (s3://bucket/prefix)."""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem

from workers.checkpoint import Checkpoint, from_bytes, sha256_bytes, to_bytes, write_atomic


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self.local = isinstance(self.fs, LocalFileSystem)

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> str:
        """Store bytes under `key` atomically (local: temp file + rename; object stores: one PUT)."""
        path = f"{self._base}/{key}"
        if self.local:
            write_atomic(path, data)
        else:
            self.fs.pipe_file(path, data)
        return self.uri(key)

    def get(self, uri: str) -> bytes:
        with fsspec.open(uri, "rb") as f:
            return f.read()

    def save_checkpoint(self, key: str, ckpt: Checkpoint) -> tuple[str, int, str]:
        """Write a checkpoint; return (uri, size in bytes, sha256 of the file)."""
        data = to_bytes(ckpt)
        return self.put(key, data), len(data), sha256_bytes(data)

    def load_checkpoint(self, uri: str) -> Checkpoint:
        return from_bytes(self.get(uri), source=f"checkpoint {uri}")
