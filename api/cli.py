"""The `ladle` command line."""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from service.artifacts import ArtifactStore
from service.pipeline import Pipeline, SequentialExecutor
from service.recorder import LocalRecorder
from service.settings import get_settings
from service.spec import JobSpec, SpecError, load_spec
from workers.checkpoint import CheckpointError
from workers.data import DataError
from workers.models import ModelError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Ladle: prune neural networks and retrain them as Sparse Model Soups.")
# piped output (a log, a file, a test) is not cut to 80 columns: the per-phase tables are wider
out_console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

USER_ERRORS = (SpecError, CheckpointError, DataError, ModelError, FileNotFoundError)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return typer.Exit(code)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _pct(x: float | None, signed: bool = False) -> str:
    return "—" if x is None else f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def phase_table(phases: list[dict[str, Any]], title: str = "") -> Table:
    """The per-phase table: sparsity, test accuracy (%) after pruning, of each ingredient (after the same
    BatchNorm recalibration as the soup), of the soup and of the ingredients' prediction ensemble;
    wall time and compute."""
    table = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="accuracies in % on the test split; Δbest: soup minus best ingredient; ensemble: "
                          "argmax of the ingredients' mean softmax; CPU s and epochs: the phase's compute")
    for col in ("phase", "sparsity", "pruned", "ingredients", "soup", "Δbest", "ensemble", "s", "CPU s", "epochs"):
        table.add_column(col, justify="left" if col == "ingredients" else "right", no_wrap=True)
    for p in phases:
        accs = p.get("ingredient_accuracies") or []
        ingredients = " ".join("fail" if a is None else f"{100 * a:.1f}" for a in accs)
        table.add_row(str(p["phase"]), _fmt(p["sparsity"], ".3f"),
                      _pct(p.get("pruned_accuracy")), ingredients or ("dense" if p["phase"] == 0 else ""),
                      _pct(p.get("soup_accuracy")), _pct(p.get("gain_over_best"), signed=True),
                      _pct(p.get("ensemble_accuracy")), _fmt((p.get("seconds") or {}).get("total"), ".1f"),
                      _fmt(p.get("cpu_seconds"), ".1f"), _fmt(p.get("epochs_trained"), "d"))
    return table


def run_local(spec: JobSpec, out: Path, *, json_output: bool = False) -> dict[str, Any]:
    """Run a job in this process with the sequential executor; models and summary.json go to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    artifacts = ArtifactStore(str((out / "models").absolute()))
    with LocalRecorder(err_console, progress=not json_output) as recorder:
        result = Pipeline(spec, SequentialExecutor(), recorder, artifacts).run()
    path = recorder.write_summary(out / "summary.json", final_model_id=result.final_model_id)
    summary = recorder.summary(final_model_id=result.final_model_id)
    if json_output:
        out_console.print_json(json.dumps(summary, default=str))
    else:
        out_console.print(phase_table(summary["phases"], title=f"{spec.name}: per phase (test accuracy)"))
        final = next(m for m in summary["models"] if m["id"] == result.final_model_id)
        out_console.print(f"final model {final['id']}: sparsity {final['sparsity']:.4f}, "
                          f"test accuracy {final['metrics'].get('test_accuracy', float('nan')):.4f}, "
                          f"{final['size_bytes']} bytes at {final['uri']}", soft_wrap=True)
        out_console.print(f"summary: {path}", soft_wrap=True)
    return summary


def follow(store, job_id: str, *, json_output: bool = False, poll: float = 0.5) -> Any:
    """Show a job's progress and events from the store until it ends; return the finished job row."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
    last_event = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  console=err_console, disable=json_output) as progress:
        bar = progress.add_task("queued", total=1.0)
        while True:
            job = store.get_job(job_id)
            for e in store.events(job_id, after_id=last_event):
                last_event = e.id
                if not json_output:
                    style = {"warning": "yellow", "error": "bold red"}.get(e.level)
                    progress.console.print(f"[{style}]{e.message}[/{style}]" if style else e.message, highlight=False)
            phase = "" if job.current_phase is None else f" · phase {job.current_phase}"
            progress.update(bar, completed=job.progress, description=f"{job.name} {job.status}{phase}")
            if job.status in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(poll)


def run_on_ray(spec: JobSpec, *, json_output: bool = False) -> dict[str, Any]:
    """Run a job through the embedded service: the DB store, a Ray cluster (a local head unless
    LADLE_RAY_ADDRESS names one), the dispatcher and a Ray-job driver. Ctrl-C cancels the job."""
    from dataclasses import asdict

    from service.driver import phase_summary
    from service.runtime import Runtime
    with Runtime() as rt:
        job = rt.store.create_job(spec)
        err_console.print(f"job {job.id} submitted to Ray at {rt.jobs_api_url}", highlight=False)
        try:
            job = follow(rt.store, job.id, json_output=json_output)
        except KeyboardInterrupt:
            rt.dispatcher.cancel(job.id)
            raise _fail(f"cancelled job {job.id}", 130) from None
        phases = [asdict(phase_summary(p)) for p in rt.store.phases(job.id)]
        summary = {"job": {"id": job.id, "name": job.name, "status": job.status, "error": job.error,
                           "final_model_id": job.final_model_id}, "phases": phases}
        if json_output:
            out_console.print_json(json.dumps(summary, default=str))
        else:
            out_console.print(phase_table(phases, title=f"{spec.name}: per phase (test accuracy)"))
        if job.status != "succeeded":
            raise _fail(f"job {job.id} {job.status}: {job.error or ''}")
        final = rt.store.get_model(job.final_model_id)
        if not json_output:
            out_console.print(f"final model {final.id}: sparsity {final.sparsity:.4f}, test accuracy "
                              f"{final.metrics.get('test_accuracy', float('nan')):.4f}, {final.size_bytes} bytes "
                              f"at {final.uri}", soft_wrap=True)
        return summary


def _default_out(spec: JobSpec) -> Path:
    return get_settings().home / "runs" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def run(spec_file: Annotated[Path, typer.Argument(help="job spec (YAML or JSON)")],
        local: Annotated[bool, typer.Option("--local", help="run in this process, sequentially, without Ray or a DB "
                                                             "(default: on Ray, recorded in the DB)")] = False,
        out: Annotated[Path | None, typer.Option("--out", help="with --local: folder for the models and summary.json")] = None,
        json_output: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False) -> None:
    """Run a job spec to the end and print the per-phase table."""
    try:
        spec = load_spec(spec_file)
        if local:
            run_local(spec, out or _default_out(spec), json_output=json_output)
        else:
            run_on_ray(spec, json_output=json_output)
    except SpecError as e:
        err_console.print(f"[bold red]error:[/bold red] invalid job spec {spec_file}:", highlight=False)
        for loc, msg in e.errors:
            err_console.print(f"  {loc}: {msg}", highlight=False)
        raise typer.Exit(2) from None
    except USER_ERRORS as e:
        raise _fail(str(e)) from None


def demo_spec(small: bool = False) -> JobSpec:
    """The packaged demo job: Fashion-MNIST with LeNet-5, or (small) digits with an MLP."""
    name = "digits-sms.yaml" if small else "fashion-sms.yaml"
    text = resources.files("service").joinpath(f"examples/{name}").read_text()
    import yaml
    return JobSpec.model_validate(yaml.safe_load(text))


def imp_spec(spec: JobSpec, dense_checkpoint: str, cpus: int) -> JobSpec:
    """Plain IMP beside a soup job: the same phases and retraining from the same dense model, one
    ingredient, with all `cpus` for it (the soup's ingredients share them)."""
    return spec.model_copy(update={
        "name": f"{spec.name}-imp",
        "model": spec.model.model_copy(update={"checkpoint": dense_checkpoint}),
        "soup": spec.soup.model_copy(update={"ingredients": 1, "min_ingredients": 1}),
        "resources": spec.resources.model_copy(update={"cpus_per_ingredient": cpus})})


def verdict(soup_phases: list[dict], imp_phases: list[dict] | None) -> list[str]:
    """One line per phase that a newcomer understands: the soup against its best ingredient, its
    ingredients' prediction ensemble and, when given, plain IMP at the same sparsity."""
    lines = []
    imp = {p["index"]: p for p in imp_phases or []}
    for p in soup_phases:
        if p["index"] == 0 or p.get("soup_accuracy") is None:
            continue
        accs = [a for a in p.get("ingredient_accuracies") or [] if a is not None]
        line = (f"phase {p['index']} ({100 * p['sparsity']:.1f}% of the weights pruned): the soup of {len(accs)} "
                f"scores {100 * p['soup_accuracy']:.2f}%, {_pp(p['soup_accuracy'] - max(accs))} its best ingredient "
                f"({100 * max(accs):.2f}%)")
        if p.get("ensemble_accuracy") is not None:
            line += f"; the {len(accs)} models' prediction ensemble {100 * p['ensemble_accuracy']:.2f}%"
        if p["index"] in imp and imp[p["index"]].get("soup_accuracy") is not None:
            a = imp[p["index"]]["soup_accuracy"]
            line += f"; {_pp(p['soup_accuracy'] - a)} plain IMP ({100 * a:.2f}%)"
        lines.append(line)
    return lines


def _pp(d: float) -> str:
    return f"{100 * abs(d):.2f} pp {'above' if d > 0 else 'below' if d < 0 else 'level with'}"


@app.command()
def demo(serve_: Annotated[bool, typer.Option("--serve/--no-serve", help="keep serving after the job (Ctrl-C stops)")] = True,
         port: Annotated[int | None, typer.Option(help="API port (default 8000, or a free one if taken)")] = None,
         small: Annotated[bool, typer.Option("--small", help="the quick job: an MLP on scikit-learn's digits")] = False,
         imp: Annotated[bool, typer.Option("--imp/--no-imp", help="also run plain IMP from the same dense model, "
                                                                  "for comparison")] = True,
         local: Annotated[bool, typer.Option("--local", help="in this process instead, without the service")] = False,
         out: Annotated[Path | None, typer.Option("--out", help="with --local: folder for models and summary.json")] = None) -> None:
    """The demo: starts the embedded service (SQLite, a local Ray head, the dispatcher, the API),
    submits the demo SMS job (LeNet-5 on Fashion-MNIST: 3 phases to 90% sparsity, 3 ingredients per
    phase; --small: an MLP on digits) through the SDK, then plain IMP from the same dense model, shows
    progress, prints the per-phase table and one line per phase comparing the soup with its best
    ingredient and with IMP, and keeps serving the dashboard until Ctrl-C."""
    import os
    import socket

    from api.client import Client
    from api.server import BackgroundServer
    from service.runtime import Runtime
    spec = demo_spec(small)
    out_console.print(f"Ladle demo: {spec.name} — {spec.model.arch} on {spec.data.name}, "
                      f"{spec.prune.phases} phases to sparsity {spec.prune.target_sparsity}, "
                      f"{spec.soup.ingredients} ingredients per phase ({spec.retrain.schedule})", highlight=False)
    if local:
        run_local(spec, out or get_settings().home / "demo")
        return
    if port is None:
        with socket.socket() as s:
            port = 8000 if s.connect_ex(("127.0.0.1", 8000)) != 0 else None
    err_console.print("starting the service (SQLite store, local Ray head, dispatcher, API) ...")
    with BackgroundServer(Runtime(), port=port or None) as server:
        err_console.print(f"dashboard on {server.url}/ (API docs: {server.url}/docs)", highlight=False)
        with Client(server.url) as c:
            job = c.submit(spec)
            err_console.print(f"submitted job {job['id']}: watch it live at {server.url}/#/jobs/{job['id']}",
                              highlight=False)
            job = c.wait(job["id"], on_event=lambda e: err_console.print(e["message"], highlight=False))
            phases = c.phases(job["id"])
            out_console.print(phase_table(_phase_rows(phases), title=f"{spec.name}: {job['status']} (test accuracy)"))
            if job["status"] != "succeeded":
                raise _fail(f"job {job['id']} {job['status']}: {job['error']}")
            imp_phases = None
            if imp:
                dense = server.runtime.store.get_model(phases[0]["model_id"])     # the in-process server's store
                imp_job = c.submit(imp_spec(spec, dense.uri, os.cpu_count() or 1))
                err_console.print(f"for comparison, plain IMP from the same dense model: job {imp_job['id']}",
                                  highlight=False)
                imp_job = c.wait(imp_job["id"], progress=True)
                if imp_job["status"] == "succeeded":
                    imp_phases = c.phases(imp_job["id"])
                else:
                    err_console.print(f"IMP job {imp_job['status']}: {imp_job['error']}", highlight=False)
            out_console.print("\n[bold]What the soup bought[/bold] (test accuracy):")
            for line in verdict(phases, imp_phases):
                out_console.print(f"  {line}", highlight=False, soft_wrap=True)
            final = c.model(job["final_model_id"])
            out_console.print(f"final model {final['id']}: sparsity {final['sparsity']:.4f}, test accuracy "
                              f"{100 * final['accuracy']:.2f}%; lineage: ladle lineage {final['id']} --url {server.url}"
                              + (f"; both jobs side by side: ladle compare {job['id']} {imp_job['id']} --url "
                                 f"{server.url}" if imp else ""), soft_wrap=True, highlight=False)
        if serve_:
            out_console.print(f"serving the dashboard at {server.url}/ (API docs at {server.url}/docs); Ctrl-C stops",
                              highlight=False)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                err_console.print("stopping")


# ---------------------------------------------------------------- the service and its clients

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="LADLE_URL", help="the Ladle server")
TOKEN = typer.Option(None, "--token", envvar="LADLE_TOKEN", help="bearer token (when auth is on)")
JSON = typer.Option(False, "--json", help="print JSON for scripts")


def _client(url: str, token: str | None):
    from api.client import Client
    return Client(url, token)


def _api_errors(fn):
    """Turn the SDK's typed errors into a one-line message and exit code 1 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import httpx

        from api.client import LadleError
        try:
            return fn(*args, **kwargs)
        except LadleError as e:
            raise _fail(e.message) from None
        except httpx.TransportError as e:
            raise _fail(f"cannot reach the Ladle server: {e}") from None
    return wrapper


@app.command()
def serve(host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="port")] = 8000) -> None:
    """Start the REST API (and the dashboard) with the dispatcher and, unless LADLE_RAY_ADDRESS is set,
    a local Ray head; all stop on exit. With LADLE_ADMIN_TOKEN set, that token is an admin token."""
    import uvicorn

    from api.app import create_app
    from service.store import Store
    settings = get_settings()
    store = Store(settings.database_url)
    if settings.admin_token is not None:
        store.ensure_token("admin", settings.admin_token.get_secret_value(), admin=True)
    if host not in LOOPBACK_HOSTS and not store.auth_enabled():
        raise _fail(f"refusing to serve on {host} without auth: create a token first "
                    "(ladle token create --name NAME --admin), or bind to 127.0.0.1", 2)
    uvicorn.run(create_app(), host=host, port=port, log_level="info")


@app.command()
@_api_errors
def submit(spec_file: Annotated[Path, typer.Argument(help="job spec (YAML or JSON)")],
           wait: Annotated[bool, typer.Option("--wait", help="wait for the job, with a progress bar")] = False,
           idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
           url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """Submit a job spec to the server."""
    if not spec_file.is_file():
        raise _fail(f"cannot read {spec_file}", 2)
    with _client(url, token) as c:
        job = c.submit(spec_file, idempotency_key=idempotency_key)
        if not json_output:
            err_console.print(f"job {job['id']} queued", highlight=False)
        if wait:
            job = c.wait(job["id"], progress=not json_output)
            if not json_output:
                out_console.print(phase_table(_phase_rows(c.phases(job["id"])), title=f"{job['name']}: {job['status']}"))
        if json_output:
            out_console.print_json(json.dumps(job))
        else:
            out_console.print(job["id"])
        if wait and job["status"] != "succeeded":
            raise typer.Exit(1)


def search_table(rows: list[dict]) -> Table:
    """The schedule-search trials, the chosen one starred."""
    fixed = ("phase", "trial", "epochs_run", "val_accuracy", "val_loss", "stopped_early", "chosen", "status")
    searched = [k for k in rows[0] if k not in fixed]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="schedule search")
    for col in ("phase", "trial", *searched, "epochs", "val acc", "ended"):
        table.add_column(col, justify="left" if col in ("trial", "schedule", "ended") else "right")
    for r in rows:
        values = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r[k] for k in searched)]
        ended = "failed" if r["status"] == "failed" else "stopped early" if r["stopped_early"] else "completed"
        table.add_row(str(r["phase"]), r["trial"] + (" *" if r["chosen"] else ""), *values, str(r["epochs_run"]),
                      "" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%", ended)
    return table


def _phase_rows(phases: list[dict]) -> list[dict]:
    return [dict(p, phase=p["index"]) for p in phases]


@app.command()
@_api_errors
def status(job_id: Annotated[str | None, typer.Argument(help="a job id; none: list the jobs")] = None,
           url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """A job's status and per-phase table, or the list of jobs."""
    with _client(url, token) as c:
        if job_id is None:
            jobs = c.jobs(limit=100)
            if json_output:
                out_console.print_json(json.dumps(jobs))
                return
            table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption=f"{jobs['count']} jobs")
            for col in ("id", "name", "status", "progress", "phase", "created"):
                table.add_column(col)
            for j in jobs["data"]:
                table.add_row(j["id"], j["name"], j["status"], f"{100 * j['progress']:.0f}%",
                              "" if j["current_phase"] is None else str(j["current_phase"]), j["created_at"][:19])
            out_console.print(table)
            return
        job, phases, search = c.job(job_id), c.phases(job_id), c.search(job_id)
        if json_output:
            out_console.print_json(json.dumps({"job": job, "phases": phases, "search": search}))
            return
        out_console.print(f"{job['id']} {job['name']}: {job['status']} {100 * job['progress']:.0f}%"
                          + (f", error: {job['error']}" if job["error"] else ""), highlight=False)
        out_console.print(phase_table(_phase_rows(phases)))
        if search:
            out_console.print(search_table(search))


@app.command()
@_api_errors
def logs(job_id: str, follow_: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new events")] = False,
         url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """A job's events."""
    with _client(url, token) as c:
        last = 0
        while True:
            for e in c.events(job_id, after=last):
                last = e["id"]
                if json_output:
                    print(json.dumps(e))
                else:
                    out_console.print(f"{e['time'][:19]} {e['level']:<7} {e['message']}", highlight=False)
            if not follow_ or c.job(job_id)["status"] in ("succeeded", "failed", "cancelled"):
                return
            time.sleep(1)


@app.command()
@_api_errors
def cancel(job_id: str, url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """Cancel a job (what finished stays)."""
    with _client(url, token) as c:
        job = c.cancel(job_id)
        out_console.print_json(json.dumps(job)) if json_output else out_console.print(f"{job_id} {job['status']}")


@app.command()
@_api_errors
def lineage(model_id: str, url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """A model's ancestors as a tree (dense -> pruned -> ingredients -> soup -> ...)."""
    from rich.tree import Tree
    with _client(url, token) as c:
        graph = c.lineage(model_id)
    if json_output:
        out_console.print_json(json.dumps(graph))
        return
    nodes = {n["id"]: n for n in graph["nodes"]}
    parents: dict[str, list[tuple[str, str]]] = {}
    for e in graph["edges"]:
        parents.setdefault(e["child"], []).append((e["parent"], e["kind"]))

    def label(n: dict, kind: str = "") -> str:
        acc = "—" if n.get("accuracy") is None else f"{100 * n['accuracy']:.2f}%"
        return f"{kind + ' ' if kind else ''}[bold]{n['kind']}[/bold] {n['name']} {n['id'][:8]} sparsity {n['sparsity']:.3f} acc {acc}"

    def grow(tree: Tree, node_id: str) -> None:
        for pid, kind in sorted(parents.get(node_id, []), key=lambda p: nodes[p[0]]["name"]):
            grow(tree.add(label(nodes[pid], f"←{kind}")), pid)

    root = Tree(label(nodes[model_id]))
    grow(root, model_id)
    out_console.print(root)


@app.command()
@_api_errors
def download(model_id: str, output: Annotated[Path, typer.Option("-o", "--output", help="file to write")],
             url: str = URL, token: str | None = TOKEN) -> None:
    """Download a model's checkpoint (safetensors)."""
    with _client(url, token) as c:
        path = c.download(model_id, output)
    out_console.print(f"wrote {path} ({path.stat().st_size} bytes)")


# ---------------------------------------------------------------- ladle compare: several jobs side by side

def _last_done(phases: list[dict]) -> dict:
    """The last phase with a soup accuracy (phase 0: the dense model), or {} when none has one yet."""
    return next((p for p in reversed(phases) if p.get("soup_accuracy") is not None), {})


def compare_table(items: list[dict]) -> Table:
    """One row per job and phase: sparsity, soup accuracy, Δ vs the best ingredient, ensemble accuracy, and
    the phase's wall time and compute; fields the server does not report show as —."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=0,   # one space between columns: fits 80
                  caption="accuracies in % on the test split; Δbest: soup minus best ingredient; "
                          "wall s, CPU s, GPU s, epochs: per phase")
    names = max((len(item["job"]["name"]) for item in items), default=3)
    table.add_column("job", min_width=min(names, 12), overflow="fold")
    for col in ("phase", "sparsity", "soup", "Δbest", "ensemble", "wall s", "CPU s", "GPU s", "epochs"):
        table.add_column(col, justify="right", no_wrap=True)
    for item in items:
        phases = item["phases"] or [{}]
        for i, p in enumerate(phases):
            table.add_row(item["job"]["name"] if i == 0 else "", _fmt(p.get("index"), "d"),
                          _fmt(p.get("sparsity"), ".3f"), _pct(p.get("soup_accuracy")),
                          _pct(p.get("gain_over_best"), signed=True), _pct(p.get("ensemble_accuracy")),
                          _fmt((p.get("seconds") or {}).get("total"), ".1f"),
                          _fmt(p.get("cpu_seconds"), ".1f"), _fmt(p.get("gpu_seconds"), ".1f"),
                          _fmt(p.get("epochs_trained"), ".0f"), end_section=i == len(phases) - 1)
    return table


def compare_summary(item: dict) -> str:
    """One line per job: its status, final sparsity and accuracies, wall time and compute."""
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.2f}%"

    def sec(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f} s"
    job, last = item["job"], _last_done(item["phases"])
    best = max((a for a in last.get("ingredient_accuracies") or [] if a is not None), default=None)
    return (f"{job['name']} {job['id'][:8]}: {job['status']}, sparsity {_fmt(job.get('sparsity'), '.3f')}, "
            f"soup {pct(last.get('soup_accuracy'))}, best ingredient {pct(best)}, "
            f"ensemble {pct(last.get('ensemble_accuracy'))}, wall {sec(job.get('wall_seconds'))}, "
            f"CPU {sec(job.get('cpu_seconds'))}, GPU {sec(job.get('gpu_seconds'))}, "
            f"epochs {_fmt(job.get('epochs_trained'), '.0f')}")


@app.command()
@_api_errors
def compare(job_ids: Annotated[list[str], typer.Argument(help="two or more job ids", metavar="JOB")],
            url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """Several jobs side by side: per phase sparsity, soup accuracy, Δ vs the best ingredient, ensemble
    accuracy, wall time and compute, then one summary line per job."""
    if len(job_ids) < 2:
        raise _fail(f"compare needs at least two job ids (got {len(job_ids)}); `ladle status` lists them", 2)
    with _client(url, token) as c:
        items = c.compare(job_ids)
    if json_output:
        out_console.print_json(json.dumps(items))
        return
    out_console.print(compare_table(items))
    for item in items:
        out_console.print(compare_summary(item), highlight=False, soft_wrap=True)


token_app = typer.Typer(help="API tokens (auth is on as soon as one exists).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(name: Annotated[str, typer.Option("--name", help="who the token is for")],
                 admin: Annotated[bool, typer.Option("--admin", help="sees and cancels every job")] = False) -> None:
    """Mint a token in the database the server uses (shown once; stored hashed)."""
    from service.store import Store
    try:
        _, secret = Store(get_settings().database_url).create_token(name, admin=admin)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    err_console.print(f"token for {name}{' (admin)' if admin else ''}; it is shown only now:", highlight=False)
    out_console.print(secret)


if __name__ == "__main__":
    app()
