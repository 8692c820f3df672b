"""What the `ladle` commands print: the two consoles, error lines, number formats, the per-phase,
search and compare tables, a followed job's progress and the demo's verdict. Printing only, no
requests and no store: the commands that talk to a server and the ones that host the service
render the same data the same way."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from api.client import Update
from service.records import METRICS, Metric, phase_columns

# piped output (a log, a file, a test) is not cut to 80 columns: the per-phase tables are wider
out_console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr; the caller raises the returned Exit (no traceback)."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return typer.Exit(code)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    """A number in `spec`, or — when there is none."""
    return "—" if x is None else format(x, spec)


def _pct(x: float | None, signed: bool = False) -> str:
    """A fraction as a percentage with two decimals (signed: with its sign), or —."""
    return "—" if x is None else f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def metric_of(job: dict | None) -> Metric:
    """A job's primary metric (JobPublic.metric), accuracy for a server that does not say."""
    return METRICS[((job or {}).get("metric") or {}).get("name", "accuracy")]


def _value(x: float | None, unit: str, metric: Metric) -> str:
    """A phase metric as its column shows it: the primary metric in % (accuracy) or as it is
    (perplexity), gains signed, seconds to a tenth, counts whole."""
    if unit == "metrics":
        return " ".join("fail" if a is None else f"{100 * a:.1f}" if metric.percent else f"{a:.2f}" for a in x or [])
    if unit in ("metric", "gain"):
        signed = unit == "gain"
        return _pct(x, signed) if metric.percent else _fmt(x, "+.2f" if signed else ".2f")
    return _fmt(x, {"seconds": ".1f", "count": "d"}.get(unit, ".4f"))


def phase_table(phases: list[dict[str, Any]], metric: Metric | None = None, title: str = "") -> Table:
    """The per-phase table (phases as the API serves them, flat): sparsity, then the phase columns of
    service.records.PHASE_COLUMNS that tables show (the primary metric after pruning, of each
    ingredient after the same BatchNorm recalibration as the soup, of the soup and of the ingredients'
    prediction ensemble; compute), and wall time."""
    metric = metric or METRICS["accuracy"]
    columns = [c for c in phase_columns(metric) if c.table]
    caption = (f"test {metric.plural}" + (" in %" if metric.percent else "") + (", lower is better" if metric.mode == "min"
               else "") + "; Δbest: soup against its best ingredient (> 0: better); ensemble: the ingredients' mean "
               "prediction; CPU s and epochs: the phase's compute")
    table = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False, caption=caption)
    for col in ("phase", "sparsity", *(c.label for c in columns), "s"):
        table.add_column(col, justify="left" if col == "ingredients" else "right", no_wrap=True)
    for p in phases:
        cells = [_value(p.get(c.key), c.unit, metric) for c in columns]
        if p["index"] == 0:
            cells[[c.unit for c in columns].index("metrics")] = "dense"
        table.add_row(str(p["index"]), _fmt(p["sparsity"], ".3f"), *cells,
                      _fmt((p.get("seconds") or {}).get("total"), ".1f"))
    return table


def final_model_line(model: dict[str, Any], metric: Metric) -> str:
    """The job's final model: id, sparsity, test score, size and where it is."""
    score = (model.get("metrics") or {}).get(f"test_{metric.name}")
    return (f"final model {model['id']}: sparsity {model['sparsity']:.4f}, test {metric.name} {_fmt(score)}, "
            f"{model['size_bytes']} bytes at {model['uri']}")


def search_table(rows: list[dict]) -> Table:
    """The schedule-search trials, the chosen one starred."""
    searched = list(dict.fromkeys(k for r in rows for k in r["searched"]))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="schedule search")
    for col in ("phase", "trial", *searched, "epochs", "val acc", "ended"):
        table.add_column(col, justify="left" if col in ("trial", "schedule", "ended") else "right")
    for r in rows:
        values = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r["searched"].get(k, "") for k in searched)]
        ended = "failed" if r["status"] == "failed" else "stopped early" if r["stopped_early"] else "completed"
        table.add_row(str(r["phase"]), f"trial{r['index']}" + (" *" if r["chosen"] else ""), *values, str(r["epochs_run"]),
                      "" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%", ended)
    return table


def jobs_table(jobs: dict) -> Table:
    """The job list (GET /jobs: `{data, count}`): id, name, status, progress, phase, creation time."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption=f"{jobs['count']} jobs")
    for col in ("id", "name", "status", "progress", "phase", "created"):
        table.add_column(col)
    for j in jobs["data"]:
        table.add_row(j["id"], j["name"], j["status"], f"{100 * j['progress']:.0f}%",
                      "" if j["current_phase"] is None else str(j["current_phase"]), j["created_at"][:19])
    return table


def _last_done(phases: list[dict], metric: Metric) -> dict:
    """The last phase with a soup score (phase 0: the dense model), or {} when none has one yet."""
    return next((p for p in reversed(phases) if p.get(metric.key("soup_{m}")) is not None), {})


def compare_table(items: list[dict]) -> Table:
    """One row per job and phase: sparsity, the soup's score, Δ vs the best ingredient, the ensemble's
    score, and the phase's wall time and compute; fields the server does not report show as —."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=0,   # one space between columns: fits 80
                  caption="accuracies in % on the test split (perplexities as they are); Δbest: soup against "
                          "its best ingredient (> 0: better); wall s, CPU s, GPU s, epochs: per phase")
    names = max((len(item["job"]["name"]) for item in items), default=3)
    table.add_column("job", min_width=min(names, 12), overflow="fold")
    for col in ("phase", "sparsity", "soup", "Δbest", "ensemble", "wall s", "CPU s", "GPU s", "epochs"):
        table.add_column(col, justify="right", no_wrap=True)
    for item in items:
        metric = metric_of(item["job"])
        phases = item["phases"] or [{}]
        for i, p in enumerate(phases):
            table.add_row(item["job"]["name"] if i == 0 else "", _fmt(p.get("index"), "d"),
                          _fmt(p.get("sparsity"), ".3f"), _value(p.get(metric.key("soup_{m}")), "metric", metric),
                          _value(p.get("gain_over_best"), "gain", metric),
                          _value(p.get(metric.key("ensemble_{m}")), "metric", metric),
                          _fmt((p.get("seconds") or {}).get("total"), ".1f"),
                          _fmt(p.get("cpu_seconds"), ".1f"), _fmt(p.get("gpu_seconds"), ".1f"),
                          _fmt(p.get("epochs_trained"), ".0f"), end_section=i == len(phases) - 1)
    return table


def compare_summary(item: dict) -> str:
    """One line per job: its status, final sparsity and scores, wall time and compute."""
    def score(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.2f}%" if metric.percent else f"{x:.2f}"

    def sec(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f} s"
    job, metric = item["job"], metric_of(item["job"])
    last = _last_done(item["phases"], metric)
    scores = [a for a in last.get(metric.key("ingredient_{ms}")) or [] if a is not None]
    return (f"{job['name']} {job['id'][:8]}: {job['status']}, sparsity {_fmt(job.get('sparsity'), '.3f')}, "
            f"soup {score(last.get(metric.key('soup_{m}')))}, "
            f"best ingredient {score(metric.best(scores) if scores else None)}, "
            f"ensemble {score(last.get(metric.key('ensemble_{m}')))}, wall {sec(job.get('wall_seconds'))}, "
            f"CPU {sec(job.get('cpu_seconds'))}, GPU {sec(job.get('gpu_seconds'))}, "
            f"epochs {_fmt(job.get('epochs_trained'), '.0f')}")


def event_line(e: dict) -> str:
    """An event as `ladle logs` prints it: time to the second, level, message."""
    return f"{e['time'][:19]} {e['level']:<7} {e['message']}"


def show_progress(updates: Iterable[Update], *, quiet: bool = False) -> dict:
    """Render a followed job on stderr (its events as they arrive, warnings yellow and errors red, and a
    bar with its status, phase and progress) until the updates end; quiet: nothing. Returns the last job."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  console=err_console, disable=quiet) as progress:
        bar = progress.add_task("queued", total=1.0)
        for events, job in updates:
            if not quiet:
                for e in events:
                    style = {"warning": "yellow", "error": "bold red"}.get(e["level"])
                    progress.console.print(f"[{style}]{e['message']}[/{style}]" if style else e["message"],
                                           highlight=False)
            phase = "" if job["current_phase"] is None else f" · phase {job['current_phase']}"
            progress.update(bar, completed=job["progress"], description=f"{job['name']} {job['status']}{phase}")
    return job


def _pp(d: float) -> str:
    """A difference of accuracies in percentage points, and which way: `1.20 pp above`."""
    return f"{100 * abs(d):.2f} pp {'above' if d > 0 else 'below' if d < 0 else 'level with'}"


def column_keys(columns: list[dict]) -> dict[str, str]:
    """{template: key} of a job's phase columns (PhasesPublic.columns): `{"soup_{m}": "soup_accuracy", ...}`."""
    return {c["template"]: c["key"] for c in columns}


def _soup_score(page: dict, index: int) -> float | None:
    """The soup score a job's phase `index` reached (None: no such phase, or none recorded); `page` is its
    GET /jobs/{id}/phases answer."""
    key = column_keys(page["columns"])["soup_{m}"]
    return next((p.get(key) for p in page["data"] if p["index"] == index), None)


def verdict(soup: dict, imps: list[tuple[str, dict]] = ()) -> list[str]:
    """One line per phase that a newcomer understands: the soup against its best ingredient, its
    ingredients' prediction ensemble and each plain IMP run given as (label, its phases) at the same
    sparsity, e.g. ("IMP, 1 epoch per phase", ...), ("IMP, 3 epochs per phase", ...). Jobs are given by
    their phase pages (GET /jobs/{id}/phases: `data`, `columns`); the metric keys come from `columns`."""
    keys = column_keys(soup["columns"])
    s_key, i_key, e_key = keys["soup_{m}"], keys["ingredient_{ms}"], keys["ensemble_{m}"]
    lines = []
    for p in soup["data"]:
        if p["index"] == 0 or p.get(s_key) is None:
            continue
        accs = [a for a in p.get(i_key) or [] if a is not None]
        line = (f"phase {p['index']} ({100 * p['sparsity']:.1f}% of the weights pruned): the soup of {len(accs)} "
                f"scores {100 * p[s_key]:.2f}%, {_pp(p[s_key] - max(accs))} its best ingredient "
                f"({100 * max(accs):.2f}%)")
        if p.get(e_key) is not None:
            line += f"; the {len(accs)} models' prediction ensemble {100 * p[e_key]:.2f}%"
        for label, imp in imps:
            if (a := _soup_score(imp, p["index"])) is not None:
                line += f"; {_pp(p[s_key] - a)} {label} ({100 * a:.2f}%)"
        lines.append(line)
    return lines


def cost_line(label: str, job: dict) -> str:
    """What a job cost, for the demo's verdict: `label: wall 61.2 s, 93.9 CPU-seconds, 12 epochs trained`."""
    def num(key: str, fmt: str) -> str:
        return "—" if job.get(key) is None else format(job[key], fmt)
    return (f"{label}: wall {num('wall_seconds', '.1f')} s, {num('cpu_seconds', '.1f')} CPU-seconds, "
            f"{num('epochs_trained', '.0f')} epochs trained")


def soup_beats(soup: dict, imps: list[tuple[str, dict]]) -> str:
    """The plain answer at the last phase: which IMP runs the soup beats and which it does not (phase
    pages as in `verdict`)."""
    key = column_keys(soup["columns"])["soup_{m}"]
    last = max((p for p in soup["data"] if p.get(key) is not None), key=lambda p: p["index"], default=None)
    if last is None:
        return "the soup job has no finished phase to compare"
    beats, not_ = [], []
    for label, imp in imps:
        if (a := _soup_score(imp, last["index"])) is not None:
            (beats if last[key] > a else not_).append(f"{label} ({100 * a:.2f}%)")
    head = f"at {100 * last['sparsity']:.1f}% sparsity the soup ({100 * last[key]:.2f}%) "
    if not beats and not not_:
        return head + "has no IMP run to compare with"
    return head + "; ".join(([f"beats {' and '.join(beats)}"] if beats else []) +
                            ([f"does not beat {' or '.join(not_)}"] if not_ else []))
