"""The records the pipeline hands to its recorder and receives from its executor, and the two
protocols between them (design section 2). Plain dataclasses: no torch, no database; the store
converts them to rows (service.store.convert), the API to its schemas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, model_serializer

if TYPE_CHECKING:
    import torch
    from torch import nn

    from workers.pruning import Masks, PruneResult
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


class Task(Protocol):
    """What the pipeline needs to know about a job's model and data (design section 6b): built by
    service.plan.make_task; implemented by workers.classification.Classification and workers.lm.task.CausalLM."""
    metric: str                         # the primary metric's name: a key of METRICS
    pretrained: bool                    # phase 0 scores the given model instead of training one
    steps_per_epoch: int
    meta: dict[str, Any]                # what a checkpoint needs to rebuild the model

    def build(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module: ...

    def full_masks(self, model: nn.Module) -> Masks:
        """All-True masks over the weights this task prunes."""

    def scores(self, model: nn.Module) -> dict[str, float]:
        """`{val,test}_{metric}` and `{val,test}_loss` (and more) over the splits that have data."""

    def val_score(self, model: nn.Module) -> float: ...

    def recalibrate(self, model: nn.Module, fraction: float) -> nn.Module: ...

    def test_probs(self, model: nn.Module) -> torch.Tensor | None: ...

    def ensemble(self, probs: list[torch.Tensor | None]) -> float | None: ...

    def prune(self, model: nn.Module, masks: Masks, target: float, *, scope: str, criterion: str,
              seed: int, pattern: str = "unstructured") -> PruneResult: ...

    def robustness(self, model: nn.Module, sparsities: Sequence[float], fraction: float) -> dict[str, Any] | None:
        """The dense model's one-shot robustness curve (workers.robustness): `{"split", "points"}`, each
        point `{"sparsity", metric, f"{metric}_raw" (before BatchNorm recalibration)}`; None when the
        task does not measure it."""


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


class RunInfo(BaseModel):
    """What a run was started with: its row's `config` (runs.config, a column typed by this model:
    service.orm.PydanticJSON). A dense run: its schedule, lr, warm-up, seed and optimizer; an ingredient:
    its `index`, what the soup varies (`vary`) and its retraining settings; a search trial: its `index`, the
    values the search drew (`search`), its whole config and whether it is the spec's own (`default`). Unset
    fields are left out of the JSON; keys of other versions are kept (extra allowed), never lost."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    index: int | None = None                    # ingredient or trial index
    vary: str | None = None                     # soup.vary of the ingredient's phase
    default: bool | None = None                 # a search trial with the spec's own config (trial 0)
    search: dict[str, Any] | None = None        # the values a search trial drew
    config: dict[str, Any] | None = None        # a search trial's whole retraining config
    seed: int | None = None
    epochs: int | None = None
    lr: float | None = None
    peak_lr: float | None = None
    warmup: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    params: str | None = None                   # a language model's retrained parameters (retrain.params)
    optimizer: dict[str, Any] | None = None     # a dense run's optimizer (SFW's constraint and radius)

    @model_serializer(mode="wrap")
    def _set_only(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


@dataclass
class RunRecord:
    name: str                       # "dense", "phase1/ingredient0"
    kind: str                       # dense | ingredient | search_trial
    phase: int
    config: RunInfo

    def __post_init__(self) -> None:
        if not isinstance(self.config, RunInfo):
            self.config = RunInfo.model_validate(self.config)


@dataclass(frozen=True)
class Metric:
    """A task's primary metric and which way is better (accuracy up, perplexity down). Phase metrics
    are named after it (`soup_accuracy`, `soup_perplexity`); gains are signed so that > 0 is better."""
    name: str                       # accuracy | perplexity
    mode: str                       # max | min
    plural: str
    percent: bool                   # shown as a percentage (accuracy) or as it is (perplexity)

    def key(self, template: str) -> str:
        """`soup_{m}` -> `soup_accuracy`; `ingredient_{ms}` -> `ingredient_accuracies`."""
        return template.format(m=self.name, ms=self.plural)

    def best(self, values: list[float]) -> float:
        return max(values) if self.mode == "max" else min(values)

    def gain(self, value: float, over: float) -> float:
        """How much better `value` is than `over` (negative: worse)."""
        return value - over if self.mode == "max" else over - value


ACCURACY = Metric("accuracy", "max", "accuracies", percent=True)
PERPLEXITY = Metric("perplexity", "min", "perplexities", percent=False)
METRICS = {m.name: m for m in (ACCURACY, PERPLEXITY)}
TASK_KINDS = ("classification", "causal_lm")


def task_kind(spec: Any) -> str:
    """The job's task (design section 6b): causal_lm for a Hugging Face model (`model.arch: hf:...`) or
    text data (`data.name: text`), classification otherwise. Takes a service.spec.JobSpec or a stored
    spec (a dict)."""
    if isinstance(spec, dict):
        arch, data = (spec.get("model") or {}).get("arch", ""), (spec.get("data") or {}).get("name", "")
    else:
        arch, data = spec.model.arch, spec.data.name
    return "causal_lm" if str(arch).startswith("hf:") or data == "text" else "classification"


TASK_METRICS = {"classification": ACCURACY, "causal_lm": PERPLEXITY}


def primary_metric(spec: Any) -> Metric:
    """The metric a job's phases are scored and its soups ranked by: accuracy up, perplexity down."""
    return TASK_METRICS[task_kind(spec)]


@dataclass(frozen=True)
class JobOutline:
    """What a list of jobs shows of each one's spec, kept in columns of its own (jobs.task,
    jobs.phases_total) when the job is stored, so that a list reads no spec at all."""
    task: str                       # TASK_KINDS
    phases: int                     # spec.prune.phases

    @property
    def metric(self) -> Metric:
        return TASK_METRICS[self.task]

    @classmethod
    def of(cls, spec: Any) -> JobOutline:
        """From a service.spec.JobSpec, or a stored spec (a dict; what is missing or malformed reads as
        an image job of 1 phase)."""
        if isinstance(spec, dict):
            phases = (spec.get("prune") or {}).get("phases") if isinstance(spec.get("prune"), dict) else None
            return cls(task_kind(spec), phases if type(phases) is int and phases >= 1 else 1)
        return cls(task_kind(spec), spec.prune.phases)


@dataclass(frozen=True)
class PhaseColumn:
    """One metric of a phase: its key in `PhaseSummary.metrics` (a template over the job's primary
    metric, see Metric.key), how to show it, and whether the phase tables show it. The store keeps
    phase metrics as JSON, the API serves them flat beside the phase's own fields and lists these
    columns, the CLI and the dashboard draw their tables from that list: a new phase metric is computed
    in service/pipeline.py and declared here."""
    key: str
    label: str
    unit: str                       # metric | metrics (a list, one per ingredient) | gain | number | seconds | count
    description: str
    table: bool = True              # a column of the phase tables (CLI, dashboard)
    template: str = ""              # `key` before it was named for a metric (`soup_{m}`): how clients find a column


PHASE_COLUMNS: tuple[PhaseColumn, ...] = (
    PhaseColumn("pruned_{m}", "pruned", "metric", "test {m} right after pruning, before retraining"),
    PhaseColumn("ingredient_{ms}", "ingredients", "metrics",
                "test {m} of each ingredient after the soup's BatchNorm recalibration (null: it failed)"),
    PhaseColumn("soup_{m}", "soup", "metric", "test {m} of the phase's result (soup; phase 0: the dense model)"),
    PhaseColumn("soup_val_{m}", "soup val", "metric", "validation {m} of the phase's result", table=False),
    PhaseColumn("soup_loss", "soup loss", "number", "test loss (cross-entropy) of the phase's result", table=False),
    PhaseColumn("gain_over_best", "Δbest", "gain", "soup minus the best ingredient (> 0: the soup is better)"),
    PhaseColumn("gain_over_mean", "Δmean", "gain", "soup minus the ingredients' mean (> 0: the soup is better)",
                table=False),
    PhaseColumn("ensemble_{m}", "ensemble", "metric",
                "test {m} of the ingredients' prediction ensemble (argmax of their mean softmax)"),
    PhaseColumn("norm_drop", "norm drop", "number", "‖θ − θ_pruned‖ / ‖θ‖ of the pruning step", table=False),
    PhaseColumn("mean_pairwise_distance", "distance", "number", "mean L2 distance between ingredients",
                table=False),
    PhaseColumn("channels_removed", "channels", "number",
                "share of the prunable channels (neurons, KV groups) removed (prune.structure channels)", table=False),
    PhaseColumn("macs_share", "MACs", "number", "multiply-accumulates of the phase's result once its removed channels "
                "are taken out, as a share of the dense model's (prune.structure channels)", table=False),
    PhaseColumn("cpu_seconds", "CPU s", "seconds", "CPU-seconds of the phase: its runs and the driver's share"),
    PhaseColumn("gpu_seconds", "GPU s", "seconds", "GPU-seconds of the phase (wall time x GPU share)", table=False),
    PhaseColumn("epochs_trained", "epochs", "count", "epochs trained by its runs (ingredients, search trials)"),
)
PHASE_KEYS = frozenset(c.key for c in PHASE_COLUMNS)


def phase_metrics(metric: Metric, values: dict[str, Any]) -> dict[str, Any]:
    """A phase's metrics (PhaseSummary.metrics) from values keyed by their PHASE_COLUMNS templates
    (`soup_{m}`), named for the job's metric (`soup_accuracy`), in the order given. A key that no column
    declares is refused: every phase metric is declared once, above."""
    unknown = sorted(set(values) - PHASE_KEYS)
    if unknown:
        raise KeyError(f"phase metrics not declared in PHASE_COLUMNS: {unknown}")
    return {metric.key(k): v for k, v in values.items()}


def structure_line(s: dict[str, Any]) -> str:
    """A structure report (a model's metrics["structure"], workers.structured) in words: `34.0% of the channels
    removed: 0.52x the parameters (141,234), 0.48x the MACs`."""
    def share(key: str) -> str:
        return f"{s[key] / s['dense_' + key]:.2f}x" if s.get("dense_" + key) else "?"
    return (f"{100 * s['channels_removed']:.1f}% of the channels removed: the model without them has {share('parameters')} "
            f"the parameters ({s['parameters']:,}) and {share('macs')} the MACs ({s['macs']:,})")


def phase_best_score(metric: Metric, metrics: dict[str, Any]) -> float | None:
    """A phase's best score by the job's metric: the best of its soup and its ingredients (finite ones;
    None when there is none)."""
    scores = [a for a in (metrics.get(metric.key("soup_{m}")), *(metrics.get(metric.key("ingredient_{ms}")) or []))
              if isinstance(a, (int, float)) and math.isfinite(a)]
    return metric.best(scores) if scores else None


def phase_columns(metric: Metric) -> list[PhaseColumn]:
    """The phase columns of a job whose primary metric is `metric`, keys and descriptions resolved."""
    return [PhaseColumn(metric.key(c.key), c.label, c.unit, metric.key(c.description), c.table, template=c.key)
            for c in PHASE_COLUMNS]


@dataclass
class PhaseSummary:
    """A finished phase: its own fields and its metrics (keys: PHASE_COLUMNS for the job's metric)."""
    phase: int
    target_sparsity: float
    sparsity: float
    model_id: str | None = None                     # the phase's result (dense or soup)
    soup_ingredients: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """As the API serves a phase: `index`, its fields and its metrics side by side."""
        return {"index": self.phase, **{f.name: getattr(self, f.name) for f in fields(self)
                                        if f.name not in ("phase", "metrics")}, **self.metrics}


class SpecView(Protocol):
    """What a recorder needs of a job spec (service.spec.JobSpec is one)."""
    name: str

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


class Recorder(Protocol):
    def job_started(self, spec: SpecView, total_epochs: int) -> None: ...
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
    val_perplexity: float | None = None  # language models
    stopped_early: bool = False         # by ASHA, at one of its rungs
    chosen: bool = False                # the best by the search's metric: the phase's ingredients use its config

    def run_config(self) -> dict[str, Any]:
        """What its run row keeps as config."""
        return {"index": self.index, "search": self.searched, "config": self.config, "default": self.default}


# The fields of a phase's summary that are columns of the phases table (its index and metrics aside)
PHASE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PhaseSummary) if f.name not in ("phase", "metrics"))


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

    def as_metrics(self) -> dict[str, Any]:
        """As a phase's metrics keep it (PHASE_COLUMNS)."""
        return {"cpu_seconds": self.cpu_seconds, "gpu_seconds": self.gpu_seconds, "epochs_trained": self.epochs_trained}


def run_metrics(out: TrainOutcome) -> dict[str, Any]:
    """A finished training run's figures, as its run and model records keep them."""
    return dict(out.scores, train_seconds=out.train_seconds, seconds=out.seconds, cpu_seconds=out.cpu_seconds,
                gpu_seconds=out.gpu_seconds, epochs_trained=out.epochs_trained)


