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


# Inside service/, every module in one layer, from the bottom up: a module imports only modules of its own
# layer or below (lazy imports and those under TYPE_CHECKING included), and no import circle exists at all
SERVICE_LAYERS = (
    # what everything may use: settings, job states, the records and protocols between the pipeline and its
    # executor and recorder (with each job's task kind and metric), the database engine, files, the cluster
    ("service", "service.settings", "service.states", "service.records", "service.db", "service.artifacts",
     "service.cluster", "service.ray_join"),
    # what a spec may name and how it is checked; the tables; the schedule search's plan
    ("service.access", "service.orm", "service.search", "service.spec", "service.plan"),
    # the store (per resource, taking a session) and the executors (in-process, Ray)
    ("service.store", "service.executors"),
    # what runs a job's phases, records them, dispatches drivers, keeps uploads and builds exports
    ("service.pipeline", "service.recorders", "service.dispatcher", "service.uploads", "service.exports"),
    # the processes: a job's driver, an export's Ray job, the embedded runtime
    ("service.driver", "service.export_job", "service.runtime"),
)
LAYER_OF = {m: i for i, layer in enumerate(SERVICE_LAYERS) for m in layer}


def service_modules() -> dict[str, Path]:
    """Every module of service/ (migrations aside: Alembic loads them), by dotted name; a package's
    submodules count as the package (service.store.jobs is service.store)."""
    out = {}
    for f in sorted((ROOT / "service").rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        if "migrations" in rel.parts:
            continue
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def unit(module: str) -> str:
    return "service.store" if module.startswith("service.store.") else module


def service_graph() -> dict[str, set[str]]:
    """module -> the service modules it imports (as units), itself left out."""
    mods = service_modules()
    graph: dict[str, set[str]] = {}
    for m, f in mods.items():
        hits = {unit(i) for i in imported_modules(f) if i in mods}
        graph.setdefault(unit(m), set()).update(hits - {unit(m)})
    return graph


def back_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer into a higher one, and every module no layer names."""
    unplaced = [f"{m} is in no layer of SERVICE_LAYERS" for m in graph if m not in LAYER_OF]
    back = [f"{m} (layer {LAYER_OF[m]}) imports {t} (layer {LAYER_OF[t]})" for m, ts in sorted(graph.items())
            for t in sorted(ts) if m in LAYER_OF and t in LAYER_OF and LAYER_OF[t] > LAYER_OF[m]]
    return unplaced + back


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module)."""
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_service_modules_import_down_the_layers_and_in_no_circle():
    graph = service_graph()
    assert set(graph) == set(LAYER_OF), "SERVICE_LAYERS names every service module, and only those"
    assert back_imports(graph) == []
    assert circles(graph) == []


def test_a_planted_back_import_or_circle_is_caught():
    graph = service_graph()
    planted = {**graph, "service.records": graph["service.records"] | {"service.pipeline"}}
    assert back_imports(planted) == ["service.records (layer 0) imports service.pipeline (layer 3)"]
    planted = {**graph, "service.access": graph["service.access"] | {"service.spec"}}
    assert circles(planted) == [["service.access", "service.spec"]]
    assert back_imports({**graph, "service.new": set()}) == ["service.new is in no layer of SERVICE_LAYERS"]


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
