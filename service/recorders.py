"""The pipeline's recorders (service.records.Recorder): `LocalRecorder` for in-process runs (`ladle
run --local`: a progress bar, event lines, a JSON summary) and `DBRecorder`, a driver's, into the
store.

`DBRecorder` makes each call one short transaction, so a driver that dies leaves everything up to
its last call and nothing half-written. Its calls are safe to repeat when a new driver resumes the
job (see service.store.runs and service.store.models.save). A recorder that knows its driver's
submission stops working for the job once the job has been given to another submission.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from service.records import ModelRecord, PhaseSummary, RunRecord
from service.spec import JobSpec
from service.store import Store, jobs, models, runs

LEVEL_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


class LocalRecorder:
    """Prints progress (one step per training epoch) and events; keeps every record for `summary()`."""

    def __init__(self, console: Console | None = None, *, progress: bool = True, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.started = time.time()
        self.spec: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.models: list[dict[str, Any]] = []
        self.runs: dict[str, dict[str, Any]] = {}
        self.phases: list[dict[str, Any]] = []
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("epochs"), TimeElapsedColumn(), console=self.console,
                                  disable=not progress, transient=False)
        self._task = None

    def __enter__(self) -> LocalRecorder:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def job_started(self, spec: JobSpec, total_epochs: int) -> None:
        self.spec = spec.model_dump(mode="json")
        self._task = self._progress.add_task(f"{spec.name}", total=total_epochs)

    def event(self, message: str, *, level: str = "info", phase: int | None = None) -> None:
        self.events.append({"time": time.time(), "level": level, "phase": phase, "message": message})
        if self.quiet and level == "info":
            return
        style = LEVEL_STYLE.get(level, "")
        self._progress.console.print(f"[{style}]{message}[/{style}]" if style else message, highlight=False)

    def phase_started(self, phase: int, target_sparsity: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, description=f"{self.spec.get('name', 'job')} · phase {phase}")

    def run_started(self, run: RunRecord) -> None:
        self.runs[run.name] = dict(asdict(run), config=run.config.model_dump(mode="json"), status="running", history=[])

    def metric(self, run_name: str, row: dict[str, float]) -> None:
        self.runs.setdefault(run_name, {"name": run_name, "history": []})["history"].append(dict(row))
        if self._task is not None:
            self._progress.advance(self._task)

    def run_finished(self, run_name: str, status: str, *, model_id: str | None = None,
                     metrics: dict[str, Any] | None = None, error: str | None = None) -> None:
        self.runs.setdefault(run_name, {"name": run_name, "history": []}).update(
            status=status, model_id=model_id, metrics=metrics or {}, error=error)

    def model_saved(self, model: ModelRecord) -> None:
        self.models.append(asdict(model))

    def phase_finished(self, summary: PhaseSummary) -> None:
        self.phases.append(summary.flat())

    def summary(self, **extra: Any) -> dict[str, Any]:
        return {"spec": self.spec, "seconds": time.time() - self.started, "phases": self.phases,
                "models": self.models, "runs": list(self.runs.values()), "events": self.events, **extra}

    def write_summary(self, path: str | Path, **extra: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(**extra), indent=2, default=str))
        return path


class DBRecorder:
    """The pipeline's recorder for one job, into the store; every call one transaction."""

    def __init__(self, store: Store, job_id: str, *, submission: str | None = None):
        self.store, self.job_id, self.submission = store, job_id, submission

    def job_started(self, spec: JobSpec, total_epochs: int) -> None:
        """Running (again, for a resumed driver); refuses a job that is finished, cancelled or not
        this driver's any more (service.store.jobs.started)."""
        with self.store.tx() as s:
            jobs.started(s, self.job_id, total_epochs, submission=self.submission)

    def event(self, message: str, *, level: str = "info", phase: int | None = None) -> None:
        with self.store.tx() as s:
            jobs.event(s, self.job_id, message, level=level, phase=phase)

    def phase_started(self, phase: int, target_sparsity: float) -> None:
        with self.store.tx() as s:
            runs.phase_started(s, self.job_id, phase, target_sparsity)

    def run_started(self, run: RunRecord) -> None:
        with self.store.tx() as s:
            runs.run_started(s, self.job_id, run)

    def metric(self, run_name: str, row: dict[str, float]) -> None:
        with self.store.tx() as s:
            runs.metric(s, self.job_id, run_name, row)

    def run_finished(self, run_name: str, status: str, *, model_id: str | None = None,
                     metrics: dict[str, Any] | None = None, error: str | None = None) -> None:
        with self.store.tx() as s:
            runs.run_finished(s, self.job_id, run_name, status, model_id=model_id, metrics=metrics, error=error)

    def model_saved(self, model: ModelRecord) -> None:
        with self.store.tx() as s:
            models.save(s, self.job_id, model)

    def phase_finished(self, summary: PhaseSummary) -> None:
        with self.store.tx() as s:
            runs.phase_finished(s, self.job_id, summary)
