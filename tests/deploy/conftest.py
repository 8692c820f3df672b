"""What the deployment files are checked against: the settings Ladle really reads, the Ray version
really pinned, and the files as a user gets them (parsed, never run: there is no Docker engine)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
# The settings a user changes between laptop and cluster (and nothing else of Ladle's)
CLUSTER_SETTINGS = {"LADLE_DATABASE_URL", "LADLE_ARTIFACTS", "LADLE_RAY_ADDRESS"}


def ladle_env_names() -> set[str]:
    """Every LADLE_* variable the settings read."""
    prefix = Settings.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", d) for d in deps if re.match(r"ray[\[=]", d)]
    assert pin, "ray is pinned with == in pyproject.toml"
    return pin.group(2)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped), as docker compose and kustomize read them."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs
