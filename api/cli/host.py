"""The commands that host the service or run a job in this process: `ladle serve` (the API, the
dispatcher and a Ray head), `ladle run` (a job in this process, or on the embedded service) and
`ladle demo`. SIGTERM and SIGHUP stop them as Ctrl-C does, so the embedded Ray head goes with them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from api.cli.render import (cost_line, err_console, fail, final_model_line, metric_of, out_console, phase_table, show_progress,
                            soup_beats, verdict)
from api.client import Update, follow
from service.cluster import HEAD_FILE, HeadInUse, ensure_head_free
from service.settings import Settings, get_settings

# What builds or runs a job (the spec's checks, the pipeline: torch, Ray, the store) is imported by the
# commands that need it, so that `ladle --help` and the client commands start in a fraction of a second.
if TYPE_CHECKING:
    from service.spec import JobSpec

STORE_POLL = 0.5            # seconds between looks at the store while `ladle run` follows its job


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix (a spec, a checkpoint, data, a model, a file, a running head):
    one message, no traceback."""
    from workers.checkpoint import CheckpointError
    from workers.data import DataError
    from workers.models import ModelError
    return (CheckpointError, DataError, ModelError, FileNotFoundError, HeadInUse)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, so that it unwinds as from Ctrl-C."""


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP end the command the way Ctrl-C does, so the embedded service and its
    Ray head are stopped on the way out; a second signal while it stops is ignored."""
    def handler(signum: int, frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)            # let the clean-up finish
        raise Stopped(signal.Signals(signum).name)
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------- ladle run

def run_local(spec: JobSpec, out: Path, *, json_output: bool = False) -> dict[str, Any]:
    """Run a job in this process with the sequential executor; models and summary.json go to `out`."""
    from service.driver import run_in_process
    from service.recorders import LocalRecorder
    from service.records import primary_metric
    out.mkdir(parents=True, exist_ok=True)
    with LocalRecorder(err_console, progress=not json_output) as recorder:
        result = run_in_process(spec, str((out / "models").absolute()), recorder)
    path = recorder.write_summary(out / "summary.json", final_model_id=result.final_model_id)
    summary = recorder.summary(final_model_id=result.final_model_id)
    if json_output:
        out_console.print_json(json.dumps(summary, default=str))
    else:
        out_console.print(phase_table(summary["phases"], primary_metric(spec), title=f"{spec.name}: per phase"))
        final = next(m for m in summary["models"] if m["id"] == result.final_model_id)
        out_console.print(final_model_line(final, primary_metric(spec)), soft_wrap=True)
        out_console.print(f"summary: {path}", soft_wrap=True)
    return summary


def follow_in_store(store, job_id: str, *, poll: float = STORE_POLL) -> Iterator[Update]:
    """The SDK's follow over an in-process store instead of HTTP: the job and its events as the API
    would show them (JobPublic, EventPublic), so that `ladle run` needs no server and no token."""
    from api.schemas import EventPublic, JobPublic

    def read_job() -> dict:
        return JobPublic.model_validate(store.get_job(job_id)).model_dump(mode="json")

    def read_events(after: int) -> list[dict]:
        return [EventPublic.model_validate(e).model_dump(mode="json") for e in store.events(job_id, after_id=after)]
    return follow(read_job, read_events, poll=poll)


def run_on_ray(spec: JobSpec, *, json_output: bool = False) -> dict[str, Any]:
    """Run a job through the embedded service: the DB store, a Ray cluster (a local head unless
    LADLE_RAY_ADDRESS names one), the dispatcher and a Ray-job driver. Ctrl-C (or SIGTERM, SIGHUP)
    stops the service and leaves the job to resume when a service starts again."""
    from service.runtime import Runtime
    from service.records import primary_metric
    from service.store.convert import phase_summary
    with Runtime() as rt:
        job_id = rt.store.create_job(spec).id
        err_console.print(f"job {job_id} submitted to Ray at {rt.jobs_api_url}", highlight=False)
        try:
            job = show_progress(follow_in_store(rt.store, job_id), quiet=json_output)
        except KeyboardInterrupt:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)         # let the service stop (on leaving `with`)
            raise fail(f"stopped; job {job_id} resumes when the service starts again (ladle serve, or "
                       f"ladle cancel {job_id} --url ... there)", 130) from None
        phases = [phase_summary(p).flat() for p in rt.store.phases(job_id)]
        summary = {"job": {k: job[k] for k in ("id", "name", "status", "error", "final_model_id")}, "phases": phases}
        if json_output:
            out_console.print_json(json.dumps(summary, default=str))
        else:
            out_console.print(phase_table(phases, primary_metric(spec), title=f"{spec.name}: per phase"))
        if job["status"] != "succeeded":
            raise fail(f"job {job_id} {job['status']}: {job['error'] or ''}")
        final = rt.store.get_model(job["final_model_id"])
        if not json_output:
            out_console.print(final_model_line(vars(final), primary_metric(spec)), soft_wrap=True)
        return summary


def _default_out(spec: JobSpec) -> Path:
    return get_settings().home / "runs" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(spec_file: Annotated[Path, typer.Argument(help="job spec (YAML or JSON)")],
        local: Annotated[bool, typer.Option("--local", help="run in this process, sequentially, without Ray or a DB "
                                                             "(default: on Ray, recorded in the DB)")] = False,
        out: Annotated[Path | None, typer.Option("--out", help="with --local: folder for the models and summary.json")] = None,
        json_output: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False) -> None:
    """Run a job spec to the end and print the per-phase table."""
    from service.access import Access
    from service.spec import SpecError, load_spec
    try:
        # the invoking user's own spec, files and code, run with their own credentials: no data roots or
        # import allow-list (those guard the service against its users: POST /jobs)
        spec = load_spec(spec_file, access=Access.trusting())
        if local:
            run_local(spec, out or _default_out(spec), json_output=json_output)
        else:
            with stop_on_signals():
                run_on_ray(spec, json_output=json_output)
    except SpecError as e:
        err_console.print(f"[bold red]error:[/bold red] invalid job spec {spec_file}:", highlight=False)
        for loc, msg in e.errors:
            err_console.print(f"  {loc}: {msg}", highlight=False)
        raise typer.Exit(2) from None
    except user_errors() as e:
        raise fail(str(e)) from None


# ---------------------------------------------------------------- ladle demo

def demo_spec(small: bool = False) -> JobSpec:
    """The packaged demo job: Fashion-MNIST with LeNet-5, or (small) digits with an MLP."""
    name = "digits-sms.yaml" if small else "fashion-sms.yaml"
    text = resources.files("service").joinpath(f"examples/{name}").read_text()
    import yaml

    from service.spec import JobSpec
    return JobSpec.model_validate(yaml.safe_load(text))


def imp_spec(spec: JobSpec, dense_checkpoint: str, cpus: int, epochs: int | None = None) -> JobSpec:
    """Plain IMP beside a soup job: the same phases and schedule from the same dense model, one
    ingredient, with all `cpus` for it (the soup's ingredients share them), retrained `epochs` per phase
    (default: the soup's k; m·k retrains as long as the soup's m ingredients together)."""
    epochs = spec.retrain.epochs if epochs is None else epochs
    return spec.model_copy(update={
        "name": f"{spec.name}-imp-{epochs}ep",
        "model": spec.model.model_copy(update={"checkpoint": dense_checkpoint}),
        "retrain": spec.retrain.model_copy(update={"epochs": epochs}),
        "soup": spec.soup.model_copy(update={"ingredients": 1, "min_ingredients": 1}),
        "resources": spec.resources.model_copy(update={"cpus_per_ingredient": cpus})})


def imp_runs(spec: JobSpec) -> list[tuple[str, int]]:
    """The IMP runs the demo sets beside a soup of m ingredients retrained k epochs per phase: IMP(k), the
    same epochs as one ingredient, and IMP(m·k), as many retraining epochs as the whole soup."""
    k, m = spec.retrain.epochs, spec.soup.ingredients
    runs = [(f"IMP at {k} epoch{'s' * (k != 1)} per phase", k)]
    if m > 1:
        runs.append((f"IMP at {m * k} epochs per phase", m * k))
    return runs


def demo(serve_: Annotated[bool, typer.Option("--serve/--no-serve", help="keep serving after the job (Ctrl-C stops)")] = True,
         port: Annotated[int | None, typer.Option(help="API port (default 8000, or a free one if taken)")] = None,
         small: Annotated[bool, typer.Option("--small", help="the quick job: an MLP on scikit-learn's digits")] = False,
         imp: Annotated[bool, typer.Option("--imp/--no-imp", help="also run plain IMP from the same dense model, "
                                                                  "for comparison")] = True,
         local: Annotated[bool, typer.Option("--local", help="in this process instead, without the service")] = False,
         out: Annotated[Path | None, typer.Option("--out", help="with --local: folder for models and summary.json")] = None) -> None:
    """The demo: starts the embedded service (SQLite, a local Ray head, the dispatcher, the API),
    submits the demo SMS job (LeNet-5 on Fashion-MNIST: 3 phases to 90% sparsity, 3 ingredients of k = 1
    epoch per phase; --small: an MLP on digits) through the SDK, then plain IMP from the same dense model
    twice: at k epochs per phase, and at m·k, as many retraining epochs as the soup's m ingredients. It
    shows progress, prints the per-phase table, one line per phase comparing the soup with its best
    ingredient and both IMP runs, each job's wall time and CPU-seconds, which IMP run the soup beats,
    and keeps serving the dashboard until Ctrl-C."""
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
    settings = get_settings()
    token = None
    if settings.auth_for("127.0.0.1"):       # LADLE_AUTH=on: the demo's client uses the deployment's admin token
        if settings.admin_token is None:
            raise fail("LADLE_AUTH=on: the demo needs LADLE_ADMIN_TOKEN (or run it with auth off, the default on "
                       "loopback)", 2)
        token = settings.admin_token.get_secret_value()
    err_console.print("starting the service (SQLite store, local Ray head, dispatcher, API) ...")
    try:
        ensure_head_free(settings.home / HEAD_FILE)
    except HeadInUse as e:
        raise fail(str(e)) from None
    with stop_on_signals(), BackgroundServer(Runtime(), port=port or None) as server:
        if token is not None:
            try:
                server.runtime.store.ensure_token("admin", token, admin=True)
            except ValueError as e:
                raise fail(f"LADLE_ADMIN_TOKEN: {e}", 2) from None
        err_console.print(f"dashboard on {server.url}/ (API docs: {server.url}/docs)", highlight=False)
        with Client(server.url, token) as c:
            job = c.submit(spec)
            err_console.print(f"submitted job {job['id']}: watch it live at {server.url}/#/jobs/{job['id']}",
                              highlight=False)
            job = c.wait(job["id"], on_event=lambda e: err_console.print(e["message"], highlight=False))
            page = c.phase_page(job["id"])
            phases = page["data"]
            out_console.print(phase_table(phases, metric_of(job), title=f"{spec.name}: {job['status']}"))
            if job["status"] != "succeeded":
                raise fail(f"job {job['id']} {job['status']}: {job['error']}")
            k = spec.retrain.epochs
            imps, costs = [], [(f"soup of {spec.soup.ingredients} × {k} epoch{'s' * (k != 1)}", job)]
            if imp:
                dense = server.runtime.store.get_model(phases[0]["model_id"])     # the in-process server's store
                for label, epochs in imp_runs(spec):
                    imp_job = c.submit(imp_spec(spec, dense.uri, os.cpu_count() or 1, epochs))
                    err_console.print(f"for comparison, plain {label} from the same dense model"
                                      + (f" (as many retraining epochs as the soup's {spec.soup.ingredients} ingredients)"
                                         if epochs > spec.retrain.epochs else "") + f": job {imp_job['id']}",
                                      highlight=False)
                    imp_job = c.wait(imp_job["id"], progress=True)
                    if imp_job["status"] == "succeeded":
                        imps.append((label, c.phase_page(imp_job["id"])))
                        costs.append((label, imp_job))
                    else:
                        err_console.print(f"IMP job {imp_job['status']}: {imp_job['error']}", highlight=False)
            out_console.print("\n[bold]What the soup bought[/bold] (test accuracy):")
            for line in verdict(page, imps):
                out_console.print(f"  {line}", highlight=False, soft_wrap=True)
            out_console.print("[bold]What each job cost[/bold] (on this machine):")
            for label, j in costs:
                out_console.print(f"  {cost_line(label, j)}", highlight=False, soft_wrap=True)
            if imps:
                out_console.print(f"[bold]In short:[/bold] {soup_beats(page, imps)}", highlight=False, soft_wrap=True)
            final = c.model(job["final_model_id"])
            out_console.print(f"final model {final['id']}: sparsity {final['sparsity']:.4f}, test accuracy "
                              f"{100 * final['accuracy']:.2f}%; lineage: ladle lineage {final['id']} --url {server.url}"
                              + (f"; the jobs side by side: ladle compare {' '.join(j['id'] for _, j in costs)} --url "
                                 f"{server.url}" if len(costs) > 1 else ""), soft_wrap=True, highlight=False)
        if serve_:
            out_console.print(f"serving the dashboard at {server.url}/ (API docs at {server.url}/docs); Ctrl-C stops",
                              highlight=False)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                err_console.print("stopping")


# ---------------------------------------------------------------- ladle serve

def serve(host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="port")] = 8000,
          workers: Annotated[int | None, typer.Option(min=1, max=64, help="API processes sharing the port "
                                                      "(default: LADLE_API_WORKERS, else 1)")] = None) -> None:
    """Start the REST API (and the dashboard) with the dispatcher and, unless LADLE_RAY_ADDRESS is set,
    a local Ray head; all stop on exit. Auth (LADLE_AUTH): on, off, or auto (the default: on unless bound
    to 127.0.0.1, localhost or ::1). With auth on it needs an admin token: a stored one (ladle token
    create --admin) or LADLE_ADMIN_TOKEN, which it keeps in the store as the admin token named "admin".
    With --workers N > 1 this process runs the dispatcher and the Ray head and N processes serve HTTP (one
    per core the API should use); a process that dies is started again."""
    import uvicorn

    from api.server import uvicorn_config
    from service.store import Store
    settings = get_settings()
    workers = workers or settings.api_workers
    auth = settings.auth_for(host)
    # every refusal comes before anything is bound or started (Ray above all)
    store = Store(settings.database_url)
    try:
        if settings.admin_token is not None:
            try:
                store.ensure_token("admin", settings.admin_token.get_secret_value(), admin=True)
            except ValueError as e:
                raise fail(f"LADLE_ADMIN_TOKEN: {e}", 2) from None
        if auth and not store.has_admin_token():
            why = "LADLE_AUTH=on" if settings.auth == "on" else f"LADLE_AUTH=auto and {host} is beyond loopback"
            raise fail(f"refusing to serve: auth is on ({why}) and there is no admin token that is neither revoked "
                       "nor expired; create one (ladle token create --name NAME --admin) or set LADLE_ADMIN_TOKEN"
                       + ("" if settings.auth == "on" else ", or bind to 127.0.0.1"), 2)
    finally:
        store.engine.dispose()
    if not auth and host not in settings.LOOPBACK_HOSTS:
        err_console.print(f"warning: auth is off (LADLE_AUTH=off) on {host}: only requests to localhost, "
                          "127.0.0.1 or [::1] are served", highlight=False)
    if not settings.ray_address:
        try:
            ensure_head_free(settings.home / HEAD_FILE)
        except HeadInUse as e:
            raise fail(str(e), 2) from None
    if workers > 1:
        return serve_workers(settings, auth, host, port, workers)
    from api.app import create_app
    # uvicorn stops gracefully on SIGINT and SIGTERM (and the app stops the runtime); SIGHUP does the same
    signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))
    server = uvicorn.Server(uvicorn_config(create_app(auth=auth), settings, host=host, port=port, log_level="info"))
    try:
        server.run()
    except KeyboardInterrupt:          # as uvicorn.run: the signal uvicorn re-raises after a clean stop
        pass
    if not server.started:
        raise typer.Exit(3)            # uvicorn has said why (as uvicorn.run)


def serve_workers(settings: Settings, auth: bool, host: str, port: int, workers: int) -> None:
    """`ladle serve --workers N`: this process runs the embedded runtime (store, Ray head, dispatcher) and
    serves no HTTP; N API processes (api.server.ApiProcesses, each api.server.worker_app) serve the port,
    and one that dies is started again. This process publishes the dispatcher's state for them
    (service.runtime.StatusFile). SIGINT, SIGTERM and SIGHUP stop the API processes (open requests get
    LADLE_HTTP_SHUTDOWN_SECONDS), then the runtime."""
    from api.server import ApiProcesses, listening_sockets, uvicorn_config
    from service.runtime import STATUS_FILE, Runtime, StatusFile
    os.environ["LADLE_AUTH"] = "on" if auth else "off"        # the API processes decide as this one did
    config = uvicorn_config(None, settings, workers=workers, host=host, port=port, log_level="info")
    try:
        sockets = listening_sockets(host, port, workers)      # before anything starts
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}", 3) from None
    runtime, done, stop = Runtime(settings), threading.Event(), threading.Event()
    publisher = threading.Thread(target=StatusFile(settings.home / STATUS_FILE).publish, args=(runtime, done),
                                 name="ladle-status", daemon=True)
    processes = ApiProcesses(config, sockets)
    started = True
    try:
        with stop_on_signals():
            runtime.start()
            publisher.start()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
        err_console.print(f"serving on http://{host}:{sockets[0].getsockname()[1]} with {workers} API processes",
                          highlight=False)
        started = processes.run(stop)
    except Stopped:
        return
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)            # let the clean-up finish
        processes.stop()
        done.set()
        if publisher.is_alive():
            publisher.join(timeout=5)
        runtime.stop()
    if not started:
        raise typer.Exit(3)                  # an API process could not start (uvicorn has said why)


COMMANDS = (run, demo, serve)
