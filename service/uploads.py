"""Uploads (design section 8): a user sends a checkpoint or a dataset file through the API, and job specs
name it as ``upload:<id>``; only its owner (and admins) may.

The body is streamed to the artifact store (``<artifacts>/uploads/<id>/<filename>``) as it arrives, hashed
on the way, and capped by the API's body limit for uploads (LADLE_MAX_UPLOAD_BYTES). It is written under a
temporary name and moved into place once whole and checked, and only then recorded: an upload that breaks
off, is too large or does not hold what its kind needs leaves no file and no row.

What each kind must hold, checked from what arrived (nothing is parsed beyond a header):
- checkpoint: a Ladle checkpoint (safetensors whose header names `state/` tensors and carries Ladle's
  metadata, and whose length is the header's), as `ladle download` gives;
- dataset: an ``.npz`` file (a zip archive: x_train, y_train, x_test, y_test) or a ``.txt`` text
  (UTF-8) for a `text` dataset, by its name's suffix.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from service.orm import UPLOAD_KINDS, Upload
from service.store.uploads import UploadQuotaExceeded
from workers.jsonsafe import JSONRefused, loads, safetensors_header

if TYPE_CHECKING:
    from service.store import Store

PREFIX = "upload:"
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
DATASET_SUFFIXES = (".npz", ".txt")
HEAD_BYTES = 1 << 20                # a checkpoint's header must lie within its first MiB


class UploadRefused(ValueError):
    """What was sent cannot be kept as an upload of that kind; the message says why."""


def check_name(kind: str, filename: str) -> None:
    if kind not in UPLOAD_KINDS:
        raise UploadRefused(f"kind must be one of {', '.join(UPLOAD_KINDS)}, not {kind!r}")
    if not FILENAME.fullmatch(filename) or ".." in filename:
        raise UploadRefused(f"filename {filename[:100]!r} must be 1-200 letters, digits, '.', '_' or '-' "
                            "(starting with a letter or digit)")
    if kind == "checkpoint" and not filename.endswith(".safetensors"):
        raise UploadRefused(f"a checkpoint's filename ends in .safetensors, not {filename!r}")
    if kind == "dataset" and not filename.endswith(DATASET_SUFFIXES):
        raise UploadRefused(f"a dataset's filename ends in {' or '.join(DATASET_SUFFIXES)} (an npz dataset, "
                            f"or a text file for a text dataset), not {filename!r}")


def content_problem(kind: str, filename: str, head: bytes, size: int) -> str | None:
    """Why the file (its first bytes `head`, `size` bytes in all) is not what its kind needs, or None."""
    if size == 0:
        return "the upload is empty"
    if kind == "checkpoint":
        try:
            header = safetensors_header(head, size)
        except JSONRefused as e:
            return f"not a Ladle checkpoint: {e}"
        try:
            ladle = loads(header.metadata["ladle"])
        except (KeyError, ValueError) as e:
            why = f"its Ladle metadata cannot be read ({e})" if isinstance(e, ValueError) else "it has no Ladle metadata"
            return f"not a Ladle checkpoint (a safetensors file with Ladle's metadata, as `ladle download` gives): {why}"
        if not isinstance(ladle, dict):
            return "not a Ladle checkpoint: its Ladle metadata is not a JSON object"
        if not any(k.startswith("state/") for k in header.tensors):
            return "not a Ladle checkpoint: it holds no model state (state/ tensors)"
        return None
    if filename.endswith(".npz") and not head.startswith(b"PK"):
        return "not an .npz file (a zip archive of arrays, as numpy.savez writes)"
    if filename.endswith(".txt") and b"\x00" in head:
        return "not a text file (it holds NUL bytes)"
    return None


def _remove(fs, *paths: str) -> None:
    for p in paths:
        try:
            if fs.exists(p):
                fs.rm(p, recursive=True)
        except OSError:
            pass


class UploadOverQuota(UploadRefused):
    """The owner's uploads would hold more than their quota (LADLE_MAX_UPLOAD_BYTES_PER_USER)."""


async def receive(chunks: AsyncIterator[bytes], *, store: Store, artifacts: str, owner: str | None, kind: str,
                  filename: str, quota: int | None = None) -> Upload:
    """Stream `chunks` into the artifact store and record the upload (see the module's docstring). Raises
    UploadRefused (nothing kept) for a bad name or content, UploadOverQuota as soon as the owner's uploads
    would hold more than `quota` bytes; any error from `chunks` (the body limit, a client that went away)
    leaves nothing either. File writes run on worker threads."""
    check_name(kind, filename)
    room = None
    if quota is not None and owner is not None:
        room = quota - await asyncio.to_thread(store.upload_bytes, owner)
    upload_id = uuid.uuid4().hex
    folder = f"{artifacts.rstrip('/')}/uploads/{upload_id}"
    fs, root = fsspec.core.url_to_fs(folder)
    final, partial = f"{root}/{filename}", f"{root}/.{filename}.partial"
    digest, size, head = hashlib.sha256(), 0, bytearray()
    try:
        await asyncio.to_thread(fs.makedirs, root, exist_ok=True)
        f = await asyncio.to_thread(fs.open, partial, "wb")
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                digest.update(chunk)
                size += len(chunk)
                if room is not None and size > room:
                    raise UploadOverQuota(str(UploadQuotaExceeded(owner, quota, quota - room)))
                if len(head) < HEAD_BYTES:
                    head += chunk[:HEAD_BYTES - len(head)]
                await asyncio.to_thread(f.write, chunk)
        finally:
            await asyncio.to_thread(f.close)
        problem = content_problem(kind, filename, bytes(head), size)
        if problem is not None:
            raise UploadRefused(f"{filename}: {problem}")
        await asyncio.to_thread(fs.mv, partial, final)
        row = Upload(id=upload_id, owner=owner, kind=kind, filename=filename, uri=fs.unstrip_protocol(final)
                     if "://" in folder else final, size_bytes=size, sha256=digest.hexdigest())
        try:
            return await asyncio.to_thread(store.add_upload, row, max_owner_bytes=quota)
        except UploadQuotaExceeded as e:          # another upload of the owner's was recorded meanwhile
            raise UploadOverQuota(str(e)) from None
    except BaseException:
        await asyncio.shield(asyncio.to_thread(_remove, fs, root))
        raise


def forget(store: Store, upload_id: str, *, owner: str | None, admin: bool) -> Upload | None:
    """Delete the caller's upload: its file, then its row (one transaction: a file that cannot be removed
    raises OSError and leaves the row, so that nothing is recorded that is gone, nor kept unrecorded).
    Jobs that already named it keep their own copy of its URL; a job started later from a stored spec that
    names it fails to read it."""
    def remove_file(row: Upload) -> None:
        fs, path = fsspec.core.url_to_fs(row.uri)
        folder = path.rsplit("/", 1)[0]
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
    return store.delete_upload(upload_id, owner=owner, admin=admin, first=remove_file)


STALE_SECONDS = 600.0       # an upload folder without a row, untouched this long, was left by a crash


def sweep(store: Store, artifacts: str, *, stale_seconds: float = STALE_SECONDS) -> list[str]:
    """Remove what crashed uploads left: folders under `<artifacts>/uploads/` that no upload row names and
    whose files have not changed for `stale_seconds` (an upload in progress, in this or another API process,
    writes its partial file all the time). Returns the ids removed. Run at start-up."""
    fs, root = fsspec.core.url_to_fs(f"{artifacts.rstrip('/')}/uploads")
    try:
        folders = [p for p in fs.ls(root, detail=False) if fs.isdir(p)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    ids = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in folders}
    known = store.upload_ids(list(ids))
    now, removed = time.time(), []
    for upload_id, folder in ids.items():
        if upload_id in known:
            continue
        try:
            files = fs.find(folder, detail=True, withdirs=False)
            newest = max((_mtime(info) for info in files.values()), default=0.0)
            if now - newest >= stale_seconds:
                fs.rm(folder, recursive=True)
                removed.append(upload_id)
        except OSError:
            continue
    return removed


def sweep_temp_files(artifacts: str, *, stale_seconds: float = STALE_SECONDS) -> int:
    """Remove the temporary files of atomic writes (`.<name>.<random>.tmp`, workers.files.write_atomic) that a
    killed process left in a local artifact store, untouched for `stale_seconds`; how many. Object stores
    are written in one request and leave none."""
    if "://" in artifacts and not artifacts.startswith("file://"):
        return 0
    root, now, removed = Path(artifacts.removeprefix("file://")), time.time(), 0
    if not root.is_dir():
        return 0
    for p in root.rglob(".*.tmp"):
        try:
            if p.is_file() and now - p.stat().st_mtime >= stale_seconds:
                p.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _mtime(info: dict) -> float:
    """A file's modification time from fsspec's info (local: `mtime`; object stores: `LastModified` or
    `last_modified`); 0 when it does not say."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return 0.0
