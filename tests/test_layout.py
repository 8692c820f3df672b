"""Imports flow api -> service -> workers: workers never imports service or api, service never api."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"workers": {"service", "api"}, "service": {"api"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[package]) for f in files}
    assert not {f: b for f, b in bad.items() if b}


def test_top_level_layout():
    for name in ("pyproject.toml", "service", "workers", "api", "tests", "deploy", "docker-compose.yml",
                 "README.md", "Makefile", "bench", ".ci/run"):
        assert (ROOT / name).exists(), name
    readme = (ROOT / "README.md").read_text()
    head = readme[:400]
    assert "make demo" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


# Inside service/, from the bottom up: what each part may not import (the parts above it)
ABOVE = {
    ("service/states.py", "service/records.py", "service/spec.py", "service/plan.py", "service/orm.py",
     "service/db.py", "service/store"): {"service.pipeline", "service.executors", "service.search", "service.driver",
                                         "service.dispatcher", "service.runtime", "service.recorders"},
    ("service/recorders.py", "service/executors.py", "service/search.py", "service/artifacts.py",
     "service/cluster.py"): {"service.pipeline", "service.driver", "service.dispatcher", "service.runtime"},
    ("service/pipeline.py",): {"service.executors", "service.search", "service.driver", "service.dispatcher",
                               "service.runtime", "service.store", "service.recorders"},
}


@pytest.mark.parametrize("parts", list(ABOVE), ids=lambda p: p[0])
def test_imports_inside_service_flow_up(parts):
    """records, plan and the store know nothing of the pipeline and the executors; the pipeline works
    against the Executor and Recorder protocols (service.records), never the store or Ray."""
    files = [f for part in parts for f in ([ROOT / part] if part.endswith(".py") else sorted((ROOT / part).rglob("*.py")))]
    bad = {}
    for f in files:
        hits = {m for m in imported_modules(f) if any(m == a or m.startswith(a + ".") for a in ABOVE[parts])}
        if hits:
            bad[str(f.relative_to(ROOT))] = sorted(hits)
    assert not bad


# What a job's driver imports (service.driver and what it runs), and the workers' plain data it builds
DRIVER_MODULES = ("service.driver", "service.pipeline", "service.executors", "service.search", "service.plan",
                  "service.spec", "service.store", "service.recorders", "service.artifacts", "workers.config",
                  "workers.units", "workers.schedules")


# What an API process uses to have an export built (service.exports.ClusterBuilder) and to reach the cluster
EXPORT_MODULES = ("service.exports", "service.runtime", "service.dispatcher")


@pytest.mark.parametrize("modules", [DRIVER_MODULES, EXPORT_MODULES], ids=["driver", "exports"])
def test_the_driver_and_the_exports_import_no_torch(modules):
    """The driver holds no model (design section 9), and an export is built on the cluster, not in the API
    process: none of these modules, nor what they import, loads torch (or numpy's tensors by way of it).
    Checked in a fresh interpreter, so this test process's imports do not count."""
    import subprocess
    import sys
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'transformers', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
