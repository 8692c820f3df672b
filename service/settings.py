"""Settings from LADLE_* environment variables (design section 4b), validated at start-up."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LADLE_", extra="ignore")

    home: Path = Path(".ladle")
    database_url: str | None = None          # default: sqlite:///$LADLE_HOME/ladle.db
    artifacts: str | None = None             # default: $LADLE_HOME/artifacts; or an fsspec URL
    ray_address: str | None = None           # unset: start a local Ray head
    max_concurrent_jobs: int = Field(2, ge=1, le=1000)
    max_jobs_per_user: int | None = Field(None, ge=1)     # running jobs per owner; unset: no limit
    # A job whose ingredient workers no node of the cluster can hold fails after this many seconds
    # (an autoscaler may add such a node meanwhile); one that waits for resources other jobs hold waits
    unschedulable_timeout: float = Field(600.0, gt=0)
    dispatch: bool = True                    # False: jobs are stored but not run (API-only replica, load tests)
    # A deployment's admin bearer token (from a Secret): `ladle serve` keeps it in the store as the
    # token named "admin", so that a server with auth on has an admin from its first start
    admin_token: SecretStr | None = Field(None, min_length=16)

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.home = self.home.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.home / 'ladle.db').absolute()}"
        if self.artifacts is None:
            self.artifacts = str((self.home / "artifacts").absolute())
        return self

    # what a spec may name (issue 15): see service/access.py and design section 8
    # Folders a spec's paths (data.path, model.checkpoint, hf:<dir>) must lie under, symlinks and `..` resolved.
    # LADLE_DATA_ROOTS: a JSON list or paths separated by ':'. Unset: $LADLE_HOME/data, $LADLE_DATA (else
    # ~/.ladle/data) and Debian's dataset folder /usr/share/datasets. Not LADLE_HOME itself: it holds the
    # database and every user's artifacts (those are never readable through a root, whatever the roots are)
    data_roots: Annotated[list[Path] | None, NoDecode] = None
    # Modules (and their submodules) an `import:<module>:<callable>` arch may name; none by default.
    # LADLE_ALLOWED_IMPORT_PREFIXES (or LADLE_ALLOW_IMPORT): a JSON list or names separated by ','
    allowed_import_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("allowed_import_prefixes", "LADLE_ALLOWED_IMPORT_PREFIXES", "LADLE_ALLOW_IMPORT"))
    max_checkpoint_bytes: int = Field(2 << 30, ge=1)    # the most a given model.checkpoint may hold (read capped)
    # limits of a shared service (issue 25)
    # an image model's parameters, counted at submission on the meta device (nothing allocated): more is a 422
    max_model_parameters: int = Field(2_000_000_000, ge=1)
    # a user's (not an admin's) jobs queued or running at once: one more is a 429 naming this limit. (Not
    # LADLE_MAX_JOBS_PER_USER: that one caps the jobs of one user the dispatcher runs at once)
    max_open_jobs_per_user: int | None = Field(100, ge=1)
    # the bytes a user's (not an admin's) uploads may hold together: more is a 413 naming this limit
    max_upload_bytes_per_user: int | None = Field(20 << 30, ge=1)
    # a job submitted without `timeout` gets this one (seconds); None: such jobs run without a limit
    default_job_timeout: float | None = Field(7 * 24 * 3600.0, gt=0, le=30 * 24 * 3600)

    @field_validator("data_roots", "allowed_import_prefixes", mode="before")
    @classmethod
    def _split(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            sep = os.pathsep if info.field_name == "data_roots" else ","
            return [part.strip() for part in text.split(sep) if part.strip()]
        return v

    @field_validator("allowed_import_prefixes")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", p)]
        if bad:
            raise ValueError(f"not module names (dotted identifiers): {bad}")
        return v

    @model_validator(mode="after")
    def _data_roots(self) -> Settings:
        if self.data_roots is None:
            ladle_data = os.environ.get("LADLE_DATA") or Path.home() / ".ladle" / "data"
            self.data_roots = [self.home / "data", Path(ladle_data), Path("/usr/share/datasets")]
        self.data_roots = list(dict.fromkeys(Path(os.path.realpath(p.expanduser())) for p in self.data_roots))
        return self

    # auth (issue 15)
    # Bearer-token auth, decided by this setting alone (never by which tokens exist): on, off, or auto =
    # on unless the server binds to loopback (127.0.0.1, localhost, ::1). With auth off the API serves
    # only requests whose Host is loopback (against DNS rebinding); `ladle serve` with auth on refuses to
    # start without a usable admin token (a stored one, or LADLE_ADMIN_TOKEN).
    auth: Literal["on", "off", "auto"] = "auto"
    LOOPBACK_HOSTS: ClassVar[tuple[str, ...]] = ("127.0.0.1", "localhost", "::1")

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_word(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    def auth_for(self, host: str | None) -> bool:
        """Whether a server bound to `host` asks for tokens; None (the bind address is unknown) counts as
        beyond loopback, so that auth fails closed."""
        if self.auth != "auto":
            return self.auth == "on"
        return host not in self.LOOPBACK_HOSTS

    # web hardening (issue 15)
    max_body_bytes: int = Field(1 << 20, ge=1)            # a request body above this many bytes: 413, not read
    max_upload_bytes: int = Field(1 << 30, ge=1)          # an upload (POST /uploads) above this: 413, nothing kept
    sse_max_seconds: float = Field(600.0, gt=0)           # an event stream ends after this; the client reconnects
    sse_streams_per_user: int = Field(8, ge=1)            # open event streams per user (all API processes); more: 429
    http_keep_alive_seconds: int = Field(5, ge=1)         # an idle keep-alive connection is closed after this
    http_header_seconds: float = Field(10.0, gt=0)        # a client must send a request's headers within this
    http_max_header_bytes: int = Field(64 * 1024, ge=1024)   # a request's headers: at most this many bytes
    http_max_concurrency: int | None = Field(1000, ge=1)  # connections and requests at once; more: 503
    http_shutdown_seconds: int = Field(10, ge=0)          # on stop, open requests (streams) get this long to end
    # API processes of `ladle serve` (sharing its port): 1 serves the API, the dashboard and the dispatcher in
    # one process; N > 1: a control process runs the dispatcher (and the embedded Ray head) and N processes
    # serve HTTP, each on a core of its own (one process serves ~400 simple requests/s on this project's VM)
    api_workers: int = Field(1, ge=1, le=64)


@lru_cache
def get_settings() -> Settings:
    return Settings()
