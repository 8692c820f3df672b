"""Settings from LADLE_* environment variables (design section 4b), validated at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
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
    # token named "admin", so a server bound beyond loopback has auth on from its first start
    admin_token: SecretStr | None = Field(None, min_length=16)

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.home = self.home.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.home / 'ladle.db').absolute()}"
        if self.artifacts is None:
            self.artifacts = str((self.home / "artifacts").absolute())
        return self

    # web hardening (issue 15)
    max_body_bytes: int = Field(1 << 20, ge=1)            # a request body above this many bytes: 413, not read
    sse_max_seconds: float = Field(600.0, gt=0)           # an event stream ends after this; the client reconnects
    sse_streams_per_user: int = Field(8, ge=1)            # open event streams per user and API process; more: 429
    http_keep_alive_seconds: int = Field(5, ge=1)         # an idle keep-alive connection is closed after this
    http_header_seconds: float = Field(10.0, gt=0)        # a client must send a request's headers within this
    http_max_header_bytes: int = Field(64 * 1024, ge=1024)   # a request's headers: at most this many bytes
    http_max_concurrency: int | None = Field(1000, ge=1)  # connections and requests at once; more: 503
    http_shutdown_seconds: int = Field(10, ge=0)          # on stop, open requests (streams) get this long to end


@lru_cache
def get_settings() -> Settings:
    return Settings()
