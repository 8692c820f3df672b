"""Settings from LADLE_* environment variables (design section 4b), validated at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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


@lru_cache
def get_settings() -> Settings:
    return Settings()
