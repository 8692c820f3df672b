"""The artifact store: checkpoints under a local folder (default) or any fsspec URL (s3://bucket/prefix).
Models are written by `workers.checkpoint.save_model` to `uri(key)` by the worker that made them; the
driver only names them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import fsspec

if TYPE_CHECKING:
    from workers.checkpoint import Checkpoint


class ArtifactStore:
    """`max_checkpoint_bytes`: the most a spec's own model.checkpoint may hold (None: no cap); the pipeline's
    own models are read whole."""

    def __init__(self, root: str, *, max_checkpoint_bytes: int | None = None):
        self.root = root.rstrip("/")
        self.max_checkpoint_bytes = max_checkpoint_bytes

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    @staticmethod
    def load_checkpoint(uri: str, *, max_bytes: int | None = None) -> Checkpoint:
        """The checkpoint at `uri` (imports torch: for workers and the API, never the driver)."""
        from workers.checkpoint import load
        return load(uri, max_bytes=max_bytes)

    @staticmethod
    def delete(uri: str) -> None:
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path)
