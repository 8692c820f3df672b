"""Uploads: files users sent through the API. Functions take an open session; the caller owns the
transaction. Whose an upload is (`owner`) is checked here, so that another user's upload and one that
does not exist look the same to the caller."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.orm import Upload


def add(s: Session, upload: Upload) -> Upload:
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
