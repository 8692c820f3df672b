"""The client commands: `ladle submit, status, logs, cancel, lineage, download, export, upload, compare` talk to a
Ladle server through the SDK (api.client) and print what it answers; nothing here touches the store
or Ray. The SDK's typed errors, a damaged download and an unreachable server end a command with one line
and exit code 1."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from api.cli.render import (compare_summary, compare_table, err_console, event_line, fail, jobs_table, out_console,
                            metric_of, phase_table, search_table)

URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="LADLE_URL", help="the Ladle server")
TOKEN = typer.Option(None, "--token", envvar="LADLE_TOKEN", help="bearer token (when auth is on)")
JSON = typer.Option(False, "--json", help="print JSON for scripts")
LOGS_POLL = 1.0             # seconds between looks at a job that `ladle logs -f` follows


def _client(url: str, token: str | None):
    from api.client import Client
    return Client(url, token)


def _api_errors(fn):
    """Turn the SDK's typed errors into a one-line message and exit code 1 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from api.client import TRANSPORT_ERRORS, DownloadError, LadleError
        try:
            return fn(*args, **kwargs)
        except LadleError as e:
            raise fail(e.message) from None
        except DownloadError as e:
            raise fail(str(e)) from None
        except TRANSPORT_ERRORS as e:
            raise fail(f"cannot reach the Ladle server: {e}") from None
    return wrapper


@_api_errors
def submit(spec_file: Annotated[Path, typer.Argument(help="job spec (YAML or JSON)")],
           wait: Annotated[bool, typer.Option("--wait", help="wait for the job, with a progress bar")] = False,
           idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
           url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """Submit a job spec to the server."""
    if not spec_file.is_file():
        raise fail(f"cannot read {spec_file}", 2)
    with _client(url, token) as c:
        job = c.submit(spec_file, idempotency_key=idempotency_key)
        if not json_output:
            err_console.print(f"job {job['id']} queued", highlight=False)
        if wait:
            job = c.wait(job["id"], progress=not json_output)
            if not json_output:
                out_console.print(phase_table(c.phases(job["id"]), metric_of(job), title=f"{job['name']}: {job['status']}"))
        if json_output:
            out_console.print_json(json.dumps(job))
        else:
            out_console.print(job["id"])
        if wait and job["status"] != "succeeded":
            raise typer.Exit(1)


@_api_errors
def status(job_id: Annotated[str | None, typer.Argument(help="a job id; none: list the jobs")] = None,
           url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """A job's status and per-phase table, or the list of jobs."""
    with _client(url, token) as c:
        if job_id is None:
            jobs = c.jobs(limit=100)
            if json_output:
                out_console.print_json(json.dumps(jobs))
            else:
                out_console.print(jobs_table(jobs))
            return
        job, phases, search = c.job(job_id), c.phases(job_id), c.search(job_id)
        if json_output:
            out_console.print_json(json.dumps({"job": job, "phases": phases, "search": search}))
            return
        out_console.print(f"{job['id']} {job['name']}: {job['status']} {100 * job['progress']:.0f}%"
                          + (f", error: {job['error']}" if job["error"] else ""), highlight=False)
        out_console.print(phase_table(phases, metric_of(job)))
        if search:
            out_console.print(search_table(search))


@_api_errors
def logs(job_id: str, follow_: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new events")] = False,
         url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """A job's events."""
    with _client(url, token) as c:
        batches = (events for events, _ in c.follow(job_id, poll=LOGS_POLL)) if follow_ else [c.events(job_id)]
        for events in batches:
            for e in events:
                if json_output:
                    print(json.dumps(e))
                else:
                    out_console.print(event_line(e), highlight=False)


@_api_errors
def cancel(job_id: str, url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """Cancel a job (what finished stays)."""
    with _client(url, token) as c:
        job = c.cancel(job_id)
        out_console.print_json(json.dumps(job)) if json_output else out_console.print(f"{job_id} {job['status']}")


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


@_api_errors
def download(model_id: str, output: Annotated[Path, typer.Option("-o", "--output", help="file to write")],
             url: str = URL, token: str | None = TOKEN) -> None:
    """Download a model's checkpoint (safetensors), checked against the server's sha256."""
    with _client(url, token) as c:
        path = c.download(model_id, output)
    out_console.print(f"wrote {path} ({path.stat().st_size} bytes)")


FORMAT = typer.Option("sparse", "--format", "-f", help="dense | sparse | hf (a folder, LLMs) | onnx (image models) | "
                                                       "compact (channel-pruned image models, smaller shapes)")


@_api_errors
def export(model_id: str,
           output: Annotated[Path, typer.Option("-o", "--output",
                                                help="file to write (hf: the folder to unpack into)")],
           format: str = FORMAT, url: str = URL, token: str | None = TOKEN) -> None:
    """Download a model in a deployable format, checked against the server's sha256: sparse (bitmask/CSR
    safetensors that loads back exact), hf (a Hugging Face folder), onnx, compact (a channel-pruned image model
    with its removed channels taken out), or dense (as `download`)."""
    from api.client import EXPORT_FORMATS
    if format not in EXPORT_FORMATS:
        raise fail(f"unknown format {format!r}; the formats are {', '.join(EXPORT_FORMATS)}", 2)
    if format == "hf" and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise fail(f"{output} exists and is not an empty folder; the hf export unpacks into a new folder", 2)
    with _client(url, token) as c, err_console.status(f"the {format} export of {model_id}") as shown:
        def progress(p: dict) -> None:      # the server's 202 while the export is built on the cluster
            shown.update(f"the {format} export of {model_id}: built on the cluster, {p.get('state', '?')} for "
                         f"{p.get('seconds', 0):.0f} s")
        path = c.export(model_id, format, output, on_progress=progress)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        out_console.print(f"wrote {path}/ ({len(files)} files, {sum(p.stat().st_size for p in files)} bytes)",
                          highlight=False)
    else:
        out_console.print(f"wrote {path} ({path.stat().st_size} bytes, {format})", highlight=False)


@_api_errors
def upload(path: Annotated[Path, typer.Argument(help="the file to send", exists=True, dir_okay=False)],
           kind: Annotated[str, typer.Option(help="checkpoint (.safetensors) or dataset (.npz, or .txt for text)")],
           url: str = URL, token: str | None = TOKEN) -> None:
    """Upload a checkpoint or a dataset file; a spec then names it as upload:<id> (model.checkpoint or
    data.path). Only you (and admins) can use it."""
    with _client(url, token) as c:
        row = c.upload(path, kind)
    out_console.print(f"uploaded {row['filename']} ({row['size_bytes']} bytes, sha256 {row['sha256'][:12]}…) as "
                      f"{row['ref']}", highlight=False)


@_api_errors
def compare(job_ids: Annotated[list[str], typer.Argument(help="two or more job ids", metavar="JOB")],
            url: str = URL, token: str | None = TOKEN, json_output: bool = JSON) -> None:
    """Several jobs side by side: per phase sparsity, soup accuracy, Δ vs the best ingredient, ensemble
    accuracy, wall time and compute, then one summary line per job."""
    if len(job_ids) < 2:
        raise fail(f"compare needs at least two job ids (got {len(job_ids)}); `ladle status` lists them", 2)
    with _client(url, token) as c:
        items = c.compare(job_ids)
    if json_output:
        out_console.print_json(json.dumps(items))
        return
    out_console.print(compare_table(items))
    for item in items:
        out_console.print(compare_summary(item), highlight=False, soft_wrap=True)


COMMANDS = (submit, status, logs, cancel, lineage, download, export, upload, compare)
