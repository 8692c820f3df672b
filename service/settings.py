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


@lru_cache
def get_settings() -> Settings:
    return Settings()
