"""The lock decides the environment: the virtualenv holds exactly what requirements/dev.txt names, at its
versions (`pip freeze` against the lock); the runtime lock (the Docker image's) pins the same versions with
the same hashes; every lock entry carries hashes; and the lock satisfies pyproject.toml's ranges, so the
library's metadata and the tested environment agree."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEV, RUNTIME = ROOT / "requirements" / "dev.txt", ROOT / "requirements" / "runtime.txt"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*[^\\]*)?\s*\\$", re.M)


def entries(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """{name: (version, hashes)} of a pip-compile lock file."""
    text = path.read_text()
    out = {}
    for m in ENTRY.finditer(text):
        block = text[m.end():].split("\n\n", 1)[0]
        hashes = []
        for line in block.splitlines()[1:]:
            if not line.startswith("    --hash="):
                break
            hashes.append(line.split("=", 1)[1].rstrip(" \\"))
        out[canonicalize_name(m.group(1))] = (m.group(2), frozenset(hashes))
    return out


def test_the_virtualenv_is_exactly_the_lock():
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    installed = {canonicalize_name(n): v for n, v in re.findall(r"^([^=\s#]+)==(\S+)$", frozen, re.M)}
    assert not [line for line in frozen.splitlines() if line and "==" not in line and not line.startswith("#")]
    locked = {name: version for name, (version, _) in entries(DEV).items()}
    extra = {n: v for n, v in installed.items() if n not in locked}
    missing = {n: v for n, v in locked.items() if n not in installed}
    other = {n: (installed[n], v) for n, v in locked.items() if n in installed and installed[n] != v}
    assert not (extra or missing or other), (
        f"the virtualenv is not the lock (rm -rf .venv; make test): installed but not locked {extra}, "
        f"locked but not installed {missing}, other versions (installed, locked) {other}")


def test_every_entry_has_hashes_and_the_runtime_lock_pins_the_same_versions():
    dev, runtime = entries(DEV), entries(RUNTIME)
    assert len(dev) > 100 and len(runtime) > 100
    assert all(hashes for _, hashes in dev.values()) and all(hashes for _, hashes in runtime.values())
    assert {n: runtime[n] for n in runtime} == {n: dev[n] for n in runtime}      # same versions, same hashes
    assert {"pytest", "playwright", "matplotlib", "pip"} <= dev.keys() - runtime.keys()
    assert {"torch", "ray", "setuptools"} <= runtime.keys()


def test_the_lock_satisfies_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for lock, requirements in ((RUNTIME, project["dependencies"]),
                               (DEV, project["dependencies"] + extras["test"] + extras["bench"])):
        pins = entries(lock)
        for text in requirements:
            req = Requirement(text)
            name = canonicalize_name(req.name)
            assert name in pins, f"{lock.name} lacks {req.name} (make lock LOCK_ARGS=)"
            assert req.specifier.contains(pins[name][0], prereleases=True), f"{lock.name}: {name}=={pins[name][0]} not {req}"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for text in build:                                  # the build backend is locked too (--no-build-isolation)
        req = Requirement(text)
        assert req.specifier.contains(entries(RUNTIME)[canonicalize_name(req.name)][0])
