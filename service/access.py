"""What a job spec may name (design section 8): code, files and models.

A spec comes from a user, and the workers act on it with the service's credentials. So a spec submitted
through the API is validated with an `Access` (pydantic's validation context, see `service.spec.parse_spec`)
that knows the operator's settings and the caller:

- code: an ``import:<module>:<callable>`` arch must name a module under one of the operator's
  `allowed_import_prefixes` (none by default). Only the name's form and the allow-list are checked: the
  API process never imports a module a user named (the workers do, when they build the model).
  ``trust_remote_code`` is refused for every language model (workers.lm.model).
- files: ``data.path`` (every dataset, text globs included), ``model.checkpoint`` and the folder of an
  ``hf:<dir>`` model must lie under one of the operator's `data_roots` once symlinks and ``..`` are resolved,
  and never inside the service's own files (the artifact store, the database). The validated spec carries
  the resolved path, so the workers read what was checked. Anything else is refused with ONE message per
  field (`outside`) that does not depend on whether the path exists; nothing outside the roots is opened or
  listed to find out. Inside the roots the precise messages (does not exist, not a folder, ...) stay.
- uploads: ``model.checkpoint`` (a checkpoint) and ``data.path`` (a dataset file) may name one of the
  caller's uploads as ``upload:<id>``, replaced by its artifact URL in the validated spec. Another user's
  upload and one that does not exist get the same answer.
- models: ``model.checkpoint`` may instead be one of the caller's own models, as ``model:<id>`` (replaced
  by the model's artifact URL in the validated spec) or as that artifact URL itself. Other URLs are refused.
  A model of another user and a model that does not exist get the same answer.

A stored spec (the driver re-parses it) and the local CLI (the invoking user's own files and code) use
`Access.trusting()`, which checks nothing of this. Without any context `parse_spec` uses `Access.from_settings`
of `get_settings()`, with no caller: a spec is never less checked than the settings say by accident.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.engine import make_url

from workers.config import GLOB_CHARS, TextError, parse_import, text_files

if TYPE_CHECKING:
    from service.settings import Settings

MODEL_PREFIX = "model:"
UPLOAD_PREFIX = "upload:"                   # the caller's upload (POST /uploads; service.uploads)
SQLITE_SIDECARS = ("", "-wal", "-shm", "-journal")


class Lookup(Protocol):
    """What the checks look up of the caller's own things: service.store.Store is one. (A protocol, so that
    checking a spec does not depend on the store, which stores specs.) Each returns None when there is none."""

    def get_model(self, model_id: str) -> Any: ...
    def model_by_uri(self, uri: str, *, job_id: str | None = None) -> Any: ...
    def get_job(self, job_id: str) -> Any: ...
    def get_upload(self, upload_id: str, *, owner: str | None = None, admin: bool = True) -> Any: ...


def _resolve(path: str | os.PathLike) -> Path | None:
    """`path` absolute, with ``~``, ``..`` and every symlink resolved (None: not a usable path). Only names are
    looked up (lstat / readlink of the components): no file is opened, no folder listed."""
    try:
        return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    except (OSError, ValueError):          # a NUL byte, a name too long, a symlink loop
        return None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


class AccessError(ValueError):
    """A spec names something the service may not read or run for this caller."""


@dataclass(frozen=True)
class Access:
    """What this spec may name: roots for files, the import allow-list, the caller and their models."""

    data_roots: tuple[Path, ...] = ()
    denied: tuple[Path, ...] = ()              # never readable through a root: the store's database, the artifacts
    allowed_imports: tuple[str, ...] = ()
    max_checkpoint_bytes: int | None = None
    max_model_parameters: int | None = None     # an image model's size, counted at submission (None: no limit)
    store: Lookup | None = None                 # to look up the caller's models (None: model:<id> is refused)
    artifacts: str | None = None               # the artifact store's root (its own URLs name models)
    owner: str | None = None                   # the caller (None with admin: auth is off)
    admin: bool = False
    trusted: bool = False                      # a stored spec, or the local CLI: nothing of this is checked
    stored: bool = False                       # a stored spec: its model and data were checked at submission
    # text paths this check expanded already: resolved path -> why it cannot be read (None: it can), so that a
    # spec's own check does not list the files again
    texts: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------ making one

    @classmethod
    def from_settings(cls, settings: Settings, *, store: Lookup | None = None, owner: str | None = None,
                      admin: bool = False) -> Access:
        """The checks for a spec from `owner` (admin: may use every model), with the operator's settings."""
        denied: list[Path] = []
        if settings.artifacts and ("://" not in settings.artifacts or settings.artifacts.startswith("file://")):
            denied.append(_resolve(settings.artifacts.removeprefix("file://")))
        url = make_url(settings.database_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            denied.extend(_resolve(url.database + suffix) for suffix in SQLITE_SIDECARS)
        denied.append(_resolve(Path(settings.home) / "ray-head.json"))
        return cls(data_roots=tuple(Path(p) for p in settings.data_roots or ()),
                   denied=tuple(p for p in denied if p is not None),
                   allowed_imports=tuple(settings.allowed_import_prefixes),
                   max_checkpoint_bytes=settings.max_checkpoint_bytes,
                   max_model_parameters=settings.max_model_parameters, store=store,
                   artifacts=(settings.artifacts or "").rstrip("/") or None, owner=owner, admin=admin)

    @classmethod
    def trusting(cls, *, store: Lookup | None = None) -> Access:
        """No checks: for a spec that was checked when it was submitted, or the local CLI's own user."""
        return cls(trusted=True, store=store, admin=True)

    @classmethod
    def of_stored(cls, *, store: Lookup | None = None) -> Access:
        """A stored spec, read back by its driver: nothing of this is checked, and neither are its model and
        data (they were when it was submitted; checking them needs the workers' libraries, torch among
        them, which a driver does not load: design section 9). A worker that cannot read them fails."""
        return cls(trusted=True, stored=True, store=store, admin=True)

    # ------------------------------------------------------------ messages

    def outside(self, field: str) -> str:
        """The one answer for a path outside the roots: the same whether or not the path exists."""
        roots = ", ".join(map(str, self.data_roots)) or "none are configured"
        what = ("a file under its data roots, one of your own models (model:<id>) or your uploads (upload:<id>)"
                if field == "model.checkpoint" else "files under its data roots or your uploads (upload:<id>)"
                if field == "data.path" else "files under its data roots")
        return (f"not readable: this service reads {what}, and no other path or URL (data roots: {roots}; the "
                f"operator sets them with LADLE_DATA_ROOTS)")

    # ------------------------------------------------------------ code

    def check_import(self, arch: str) -> None:
        """``import:<module>:<callable>``: a well-formed name whose module the operator allows. Nothing is imported."""
        module, _ = parse_import(arch)
        if self.trusted:
            return
        if not any(module == p or module.startswith(p + ".") for p in self.allowed_imports):
            allowed = ", ".join(self.allowed_imports) or "none"
            raise AccessError(f"arch {arch!r}: this service does not run the module {module!r}; the operator allows "
                              f"import: archs from these modules only: {allowed} (LADLE_ALLOWED_IMPORT_PREFIXES)")

    # ------------------------------------------------------------ files

    def readable(self, path: str | os.PathLike) -> Path | None:
        """`path` resolved when it lies under a data root and in none of the service's own files, else None."""
        p = _resolve(path)
        if p is None or not any(_within(p, root) for root in self.data_roots):
            return None
        if any(_within(p, d) for d in self.denied):
            return None
        return p

    def upload(self, field: str, value: str, kind: str) -> str:
        """``upload:<id>``, the caller's upload of this kind: its artifact URL, else AccessError."""
        upload_id = value.removeprefix(UPLOAD_PREFIX).strip()
        row = (self.store.get_upload(upload_id, owner=self.owner, admin=self.admin or self.trusted)
               if self.store is not None and upload_id else None)
        if row is None:
            raise AccessError(f"{field}: no upload {upload_id!r} among your uploads"
                              + ("" if self.store is not None else " (upload:<id> is read through the API)"))
        if row.kind != kind:
            raise AccessError(f"{field}: upload {upload_id} is a {row.kind}; {field} names a {kind}")
        if kind == "checkpoint" and self.max_checkpoint_bytes is not None and row.size_bytes > self.max_checkpoint_bytes:
            raise AccessError(f"{field}: upload {upload_id} holds {row.size_bytes} bytes, more than the "
                              f"{self.max_checkpoint_bytes} this service reads (LADLE_MAX_CHECKPOINT_BYTES)")
        return row.uri

    def path(self, field: str, value: str) -> str:
        """A file or folder a spec names (data.path, an hf: folder): resolved, or `AccessError(outside)`; for
        data.path also the caller's dataset upload (``upload:<id>``: its artifact URL)."""
        if field == "data.path" and value.startswith(UPLOAD_PREFIX):
            return self.upload(field, value, "dataset")
        if self.trusted:
            return value
        p = self.readable(value)
        if p is None:
            raise AccessError(self.outside(field))
        if field == "model.arch" and p.is_dir():
            self._folder_inside(field, p)
        return str(p)

    MAX_FOLDER_FILES = 10_000

    def _folder_inside(self, field: str, folder: Path) -> None:
        """Every file in a model's folder (config.json, the weights, the tokenizer's files; what a worker's
        from_pretrained reads) resolves under the roots too: a symlink out of them is refused like the path."""
        for n, p in enumerate(folder.rglob("*")):
            if n >= self.MAX_FOLDER_FILES:
                raise AccessError(f"{field}: the folder holds more than {self.MAX_FOLDER_FILES} files")
            if (p.is_file() or p.is_symlink()) and self.readable(p) is None:
                raise AccessError(self.outside(field))

    def text_path(self, field: str, value: str) -> str:
        """A text dataset's path (a file, a folder or a glob): its part before the first wildcard resolved under a
        root (no ``..`` after a wildcard), and every file it stands for under a root too. Or the caller's
        dataset upload (``upload:<id>``: its artifact URL)."""
        if value.startswith(UPLOAD_PREFIX):
            return self.upload(field, value, "dataset")
        if self.trusted:
            return value
        parts = Path(os.path.expanduser(value)).parts
        first = next((i for i, part in enumerate(parts) if GLOB_CHARS & set(part)), len(parts))
        if any(part == ".." for part in parts[first:]):
            raise AccessError(self.outside(field))
        if first == 0:                      # a relative glob: its fixed part is the working folder
            base = self.readable(".")
        else:
            base = self.readable(Path(*parts[:first]))
        if base is None:
            raise AccessError(self.outside(field))
        resolved = str(Path(base, *parts[first:]))
        try:
            files = text_files(resolved)
        except TextError as e:
            self.texts[resolved] = str(e)   # inside the roots: the spec's own check gives this message
            return resolved
        if any(self.readable(f) is None for f in files):
            raise AccessError(self.outside(field))
        self.texts[resolved] = None
        return resolved

    # ------------------------------------------------------------ models

    def _own_model(self, *, model_id: str | None = None, uri: str | None = None) -> Any:
        """The caller's model with this id or artifact URL (None: no such model, or another user's)."""
        if self.store is None:
            return None
        if model_id is not None:
            model = self.store.get_model(model_id)
        else:                               # the pipeline's layout: <artifacts>/jobs/<job id>/<model name>
            key = uri.removeprefix(f"{self.artifacts}/").split("/")
            model = self.store.model_by_uri(uri, job_id=key[1] if len(key) > 2 and key[0] == "jobs" else None)
        if model is None:
            return None
        if self.trusted or self.admin:
            return model
        job = self.store.get_job(model.job_id)
        return model if job is not None and job.owner is not None and job.owner == self.owner else None

    def checkpoint(self, value: str) -> str:
        """model.checkpoint: the caller's model (``model:<id>`` becomes its artifact URL, or that URL itself),
        else a file under the data roots (resolved, a regular file, at most `max_checkpoint_bytes`)."""
        field = "model.checkpoint"
        if "\x00" in value:
            raise AccessError(self.outside(field))
        if value.startswith(UPLOAD_PREFIX):
            return self.upload(field, value, "checkpoint")
        if value.startswith(MODEL_PREFIX):
            model_id = value.removeprefix(MODEL_PREFIX).strip()
            model = self._own_model(model_id=model_id) if model_id else None
            if model is None:
                raise AccessError(f"no model {model_id!r} among your models"
                                  + ("" if self.store is not None else " (model:<id> is read through the API)"))
            return model.uri
        if self.trusted:
            return value
        if self.artifacts and value.startswith(self.artifacts + "/") and self._own_model(uri=value) is not None:
            return value
        if "://" in value:
            raise AccessError(self.outside(field))
        p = self.readable(value)
        if p is None:
            raise AccessError(self.outside(field))
        if not p.is_file():
            raise AccessError(f"checkpoint file {value!r} does not exist" if not p.exists() else
                              f"{value!r} is not a file (a .safetensors checkpoint is needed)")
        if self.max_checkpoint_bytes is not None and p.stat().st_size > self.max_checkpoint_bytes:
            raise AccessError(f"checkpoint file {value!r} holds {p.stat().st_size} bytes, more than the "
                              f"{self.max_checkpoint_bytes} this service reads (LADLE_MAX_CHECKPOINT_BYTES)")
        return str(p)


def access_of(context: Any) -> Access:
    """The `Access` a validation context carries; without one, the settings' checks with no caller."""
    if isinstance(context, Access):
        return context
    if isinstance(context, dict) and isinstance(context.get("access"), Access):
        return context["access"]
    from service.settings import get_settings
    return Access.from_settings(get_settings())


__all__ = ["Access", "AccessError", "MODEL_PREFIX", "UPLOAD_PREFIX", "access_of"]
