"""Uploads: files users sent through the API. Functions take an open session; the caller owns the
transaction. Whose an upload is (`owner`) is checked here, so that another user's upload and one that
does not exist look the same to the caller."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.orm import Upload


class UploadQuotaExceeded(RuntimeError):
    """The owner's uploads would hold more bytes than the service allows (Settings.max_upload_bytes_per_user)."""

    def __init__(self, owner: str, limit: int, used: int):
        super().__init__(f"{owner}'s uploads hold {used} bytes; with this one they would pass this service's limit "
                         f"of {limit} bytes per user (LADLE_MAX_UPLOAD_BYTES_PER_USER): delete some first")
        self.limit, self.used = limit, used


def used_bytes(s: Session, owner: str) -> int:
    """The bytes the owner's uploads hold together."""
    return int(s.scalar(sa.select(sa.func.coalesce(sa.func.sum(Upload.size_bytes), 0)).where(Upload.owner == owner)) or 0)


def add(s: Session, upload: Upload, *, max_owner_bytes: int | None = None) -> Upload:
    """Record the upload; with `max_owner_bytes`, UploadQuotaExceeded when its owner's uploads would hold more
    (counted under a lock per owner, so that racing uploads cannot pass it together)."""
    if max_owner_bytes is not None and upload.owner is not None:
        if s.bind.dialect.name == "postgresql":
            s.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(f"upload:{upload.owner}"))))
        used = used_bytes(s, upload.owner)
        if used + upload.size_bytes > max_owner_bytes:
            raise UploadQuotaExceeded(upload.owner, max_owner_bytes, used)
    s.add(upload)
    s.flush()
    return upload


def get(s: Session, upload_id: str, *, owner: str | None, admin: bool) -> Upload | None:
    """The upload, if the caller may use it: their own, or any for an admin (auth off: every caller is)."""
    row = s.get(Upload, upload_id)
    return row if row is not None and (admin or (owner is not None and row.owner == owner)) else None


def page(s: Session, *, owner: str | None, admin: bool, limit: int = 100, offset: int = 0) -> tuple[list[Upload], int]:
    """The caller's uploads (an admin's: everyone's), newest first, and their count."""
    where = [] if admin else [Upload.owner == owner] if owner is not None else [sa.false()]
    count = int(s.scalar(sa.select(sa.func.count()).select_from(Upload).where(*where)) or 0)
    rows = s.scalars(sa.select(Upload).where(*where).order_by(Upload.created_at.desc(), Upload.id.desc())
                     .limit(limit).offset(offset)).all()
    return list(rows), count


def delete(s: Session, upload: Upload) -> None:
    s.delete(upload)
