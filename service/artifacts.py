"""The artifact store: checkpoints under a local folder (default) or any fsspec URL (s3://bucket/prefix).
Models are written by `workers.checkpoint.save_model` to `uri(key)` (by the driver, or by the worker
that trained them)."""

from __future__ import annotations

import fsspec

from workers.checkpoint import Checkpoint, load


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    @staticmethod
    def load_checkpoint(uri: str) -> Checkpoint:
        return load(uri)

    @staticmethod
    def delete(uri: str) -> None:
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path)
