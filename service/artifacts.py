"""The artifact store: checkpoints under a local folder (default) or any fsspec URL (s3://bucket/prefix)."""

from __future__ import annotations

import fsspec

from workers.checkpoint import Checkpoint, load, save


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    def save_checkpoint(self, key: str, ckpt: Checkpoint) -> tuple[str, int, str]:
        """Write a checkpoint under `key`; return (uri, size in bytes, sha256 of the file)."""
        uri = self.uri(key)
        size, sha = save(uri, ckpt)
        return uri, size, sha

    @staticmethod
    def load_checkpoint(uri: str) -> Checkpoint:
        return load(uri)

    @staticmethod
    def delete(uri: str) -> None:
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path)
