"""The records the pipeline hands to its recorder and receives from its executor, and the two
protocols between them (design section 2). Plain dataclasses: no torch, no database; the store
converts them to rows (service.store.convert), the API to its schemas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.spec import JobSpec
    from workers.tasks import TrainOutcome, TrainTask

# A job's progress (epochs trained / epochs planned) stays below 1 until its end is recorded
PROGRESS_BEFORE_END = 0.99

EpochCallback = Callable[[str, dict[str, float]], None]
ResultCallback = Callable[["TrainTask", "TrainOutcome | BaseException"], None]


class Executor(Protocol):
    slots: int
    in_process: bool        # tasks run in the driver's process (their CPU time is the driver's too)

    def run(self, tasks: list[TrainTask], on_epoch: EpochCallback,
            on_result: ResultCallback | None = None) -> list[TrainOutcome | BaseException]:
        """Run every task; report each epoch's metrics and each task's end (its outcome or the
        exception that ended it) as they happen; return the outcomes in task order."""

    def search(self, tasks: list[TrainTask], on_epoch: EpochCallback, *, metric: str, mode: str,
               scheduler: str, grace_period: int, reduction_factor: int) -> dict[str, str | BaseException]:
        """Run the trials of a schedule search, stopping weak ones early (ASHA on `metric` per epoch)
        where the executor can; report each epoch's metrics as it happens. Returns per trial name how
        it ended: "completed", "stopped" (early) or the exception."""


@dataclass
class ModelRecord:
    id: str
    kind: str                       # dense | pruned | ingredient | soup
    phase: int
    name: str
    uri: str
    size_bytes: int
    sha256: str
    sparsity: float
    nonzeros: int
    metrics: dict[str, Any]
    parents: list[tuple[str, str]]  # (parent model id, edge kind: pruned_from | retrained_from | averaged_from)


@dataclass
class RunRecord:
    name: str                       # "dense", "phase1/ingredient0"
    kind: str                       # dense | ingredient
    phase: int
    config: dict[str, Any]


@dataclass
class PhaseSummary:
    phase: int
    target_sparsity: float
    sparsity: float
    pruned_accuracy: float | None = None            # test accuracy right after pruning
    ingredient_accuracies: list[float | None] = field(default_factory=list)   # after BN recalibration; None: failed
    soup_accuracy: float | None = None
    soup_val_accuracy: float | None = None
    gain_over_best: float | None = None
    gain_over_mean: float | None = None
    norm_drop: float | None = None
    mean_pairwise_distance: float | None = None
    soup_ingredients: list[int] = field(default_factory=list)
    model_id: str | None = None                     # the phase's result (dense or soup)
    seconds: dict[str, float] = field(default_factory=dict)
    ensemble_accuracy: float | None = None          # the ingredients' prediction ensemble (mean softmax)
    cpu_seconds: float | None = None                # compute of the phase: its runs and the driver's share
    gpu_seconds: float | None = None
    epochs_trained: int | None = None               # by its runs (ingredients, search trials; phase 0: dense)


class Recorder(Protocol):
    def job_started(self, spec: JobSpec, total_epochs: int) -> None: ...
    def event(self, message: str, *, level: str = "info", phase: int | None = None) -> None: ...
    def phase_started(self, phase: int, target_sparsity: float) -> None: ...
    def run_started(self, run: RunRecord) -> None: ...
    def metric(self, run_name: str, row: dict[str, float]) -> None: ...
    def run_finished(self, run_name: str, status: str, *, model_id: str | None = None,
                     metrics: dict[str, Any] | None = None, error: str | None = None) -> None: ...
    def model_saved(self, model: ModelRecord) -> None: ...
    def phase_finished(self, summary: PhaseSummary) -> None: ...


@dataclass
class JobResult:
    phases: list[PhaseSummary]     # phases[0] is the dense model (phase 0)
    final_model_id: str


@dataclass
class ResumePoint:
    """Where an interrupted job continues: after its last completed phase, reusing what the
    interrupted phase had already finished (its pruned model and finished ingredients)."""
    phases: list[PhaseSummary]                 # completed phases 0..k, in order
    parent: ModelRecord                        # the result of phase k (dense or soup)
    pruned: ModelRecord | None = None          # phase k+1's pruned model, if it was saved
    ingredients: dict[str, ModelRecord] = field(default_factory=dict)   # finished ones of phase k+1, by run name
    searched: dict[str, Any] | None = None     # the config phase k+1's finished search chose


@dataclass
class SearchTrial:
    """One trial of a phase's schedule search: the retraining config it ran (`config`: the fields of
    service.plan.RetrainConfig), the values the search drew (`searched`), how far it got and whether
    it won. Written by the pipeline as a run (kind search_trial), served by the API as it is here."""
    phase: int
    index: int
    name: str
    status: str
    config: dict[str, Any]
    searched: dict[str, Any]
    default: bool                       # trial 0: the spec's own retraining config
    epochs_run: int | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    stopped_early: bool = False         # by ASHA, at one of its rungs
    chosen: bool = False                # the best by the search's metric: the phase's ingredients use its config

    def run_config(self) -> dict[str, Any]:
        """What its run row keeps as config."""
        return {"index": self.index, "search": self.searched, "config": self.config, "default": self.default}


# Every field of a phase's summary, as the phases table keeps them (but its index)
PHASE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PhaseSummary) if f.name != "phase")


@dataclass
class Compute:
    """What a run, a phase or a job consumed: CPU-seconds (process CPU time, all threads), GPU-seconds
    (wall time x the GPU share held, on CUDA) and epochs trained. Runs add up to their phase, together
    with the driver's own share (pruning, soup, BatchNorm recalibration, evaluation); phases add up to
    the job."""
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    epochs_trained: int = 0

    def add(self, cpu_seconds: float | None = 0.0, gpu_seconds: float | None = 0.0,
            epochs_trained: int | None = 0) -> None:
        self.cpu_seconds += cpu_seconds or 0.0
        self.gpu_seconds += gpu_seconds or 0.0
        self.epochs_trained += int(epochs_trained or 0)

    def add_outcome(self, out: TrainOutcome) -> None:
        self.add(out.cpu_seconds, out.gpu_seconds, out.epochs_trained)


def run_metrics(out: TrainOutcome) -> dict[str, Any]:
    """A finished training run's figures, as its run and model records keep them."""
    return dict(out.scores, train_seconds=out.train_seconds, seconds=out.seconds, cpu_seconds=out.cpu_seconds,
                gpu_seconds=out.gpu_seconds, epochs_trained=out.epochs_trained)


