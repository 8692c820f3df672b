"""Units of work: plain data that an executor runs on a worker (service.executors), and the small
records they return. Importable without torch: the driver builds them, a worker runs them.

Every unit has a `name`, `threads` (set by the worker that runs it), `gpus` (the GPU share it holds,
for accounting) and `run(on_epoch)`, which imports its implementation on first use. Models travel
as artifact URLs, never as tensors: a unit loads what it needs (workers.steps caches the last
checkpoints and the job's task in the worker's process) and saves what it makes.

Trainings:  `TrainTask` (image models: the dense run, an ingredient, a search trial), `LMTask` (PERP
            retraining of a causal language model); both return a `TrainOutcome`.
Phase steps (design section 9, a thin driver), implemented in workers.steps:
  `Describe`    what the pipeline needs to plan a job: metric, steps per epoch, the rebuild metadata,
                and a given checkpoint's own metadata (its dense LR history)
  `LoadModel`   phase 0 of a pretrained model or a given checkpoint: score, robustness curve, save
  `Robustness`  the one-shot robustness curve of a saved dense model
  `Prune`       prune a saved model (calibrated for language models), score and save the result
  `Soup`        average the ingredients (uniform or greedy, candidates scored on val), recalibrate,
                score, measure the prediction ensemble and the ingredients' distances, save the soup
An export:  `Export` builds one export format of a stored model (service.exports runs it as a Ray job
            with the model's resources, or in-process), returning an `ExportOut`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.config import CheckpointMeta, DataConfig, OptimizerConfig, PerpConfig, SavedModel, TextConfig

EpochReport = Callable[[dict[str, float]], None]


# ---------------------------------------------------------------- the job's task, as a worker builds it

@dataclass(frozen=True)
class TaskSpec:
    """How a worker builds the job's task (service.records.Task): `classification`
    (workers.classification.Classification over `data`, a DataConfig) or `causal_lm`
    (workers.lm.task.CausalLM over `data`, a TextConfig), split by `seed`; `structure` (prune.structure):
    what its pruning removes, single weights or whole channels (and the soup step checks they stay removed)."""
    kind: str
    arch: str
    data: DataConfig | TextConfig
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    structure: str = "unstructured"


# ---------------------------------------------------------------- trainings

@dataclass
class Finish:
    """After training: recalibrate BatchNorm over the first `recal_fraction` of the unshuffled training
    batches (as the soup is), score on val and test (plus the scores before recalibration, suffixed
    `_raw`, for a model with BatchNorm), save the test softmax to `probs_url` (for the prediction
    ensemble; `probs`: return it instead), and save the checkpoint to `url` with `meta`."""
    url: str
    meta: dict[str, Any] = field(default_factory=dict)
    recal_fraction: float = 0.0
    probs: bool = False
    probs_url: str | None = None


@dataclass
class TrainTask:
    name: str                              # "dense", "phase2/ingredient1", ...
    arch: str
    data: DataConfig
    data_seed: int                         # the job's seed: fixes the train/val/test split
    lrs: list[float]                       # per-step learning rates, len = epochs * batches per epoch
    epochs: int
    seed: int = 0                          # batch order, augmentation, dropout, (dense) initialisation
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_state: Any = None                 # a state dict to start from (None: init_url, or a fresh model)
    masks: Any = None                      # pruned weights stay exactly zero (None: init_url's masks)
    optimizer: OptimizerConfig = OptimizerConfig()
    params: str = "all"
    augment: bool = False
    threads: int | None = None             # torch intra-op threads on a worker
    info: dict[str, Any] = field(default_factory=dict)   # what varies, for the record
    resume_url: str | None = None          # epoch checkpoint: written after every epoch, resumed from if present
    finish: Finish | None = None           # recalibrate, score and save in the worker
    gpus: float = 0.0                      # the GPU share the executor gives the task (for accounting)
    init_url: str | None = None            # the checkpoint to start from (its state and masks)
    keep_state: bool = True                # return the trained state (False: it is saved, nothing travels)

    def run(self, on_epoch: EpochReport | None = None) -> TrainOutcome:
        from workers.tasks import run_train_task
        return run_train_task(self, on_epoch)


@dataclass
class LMTask:
    """One PERP retraining of a pruned causal LM (an ingredient or a search trial), run by
    workers.lm.task.run_lm_task."""
    name: str
    arch: str
    data: TextConfig
    data_seed: int                         # the job's seed: fixes the split
    perp: PerpConfig
    init_state: Any = None                 # None: init_url's state
    masks: Any = None                      # None: init_url's masks
    seed: int = 0                          # batch order and adapter initialisation
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    finish: Finish | None = None           # score and save in the worker
    gpus: float = 0.0
    resume_url: str | None = None          # not used: a retried LM task starts over
    init_url: str | None = None
    keep_state: bool = True

    @property
    def epochs(self) -> int:
        return self.perp.epochs

    def run(self, on_epoch: EpochReport | None = None) -> TrainOutcome:
        from workers.lm.task import run_lm_task
        return run_lm_task(self, on_epoch)


@dataclass
class TrainOutcome:
    name: str
    state: Any                             # the trained state dict ({} unless the task keeps it)
    history: list[dict[str, float]]
    steps: int
    train_seconds: float                   # inside training steps
    seconds: float                         # the whole task, set-up included
    resumed_from_epoch: int = 0            # > 0: continued from an epoch checkpoint (a retried task)
    epochs_trained: int = 0                # epochs this attempt trained
    cpu_seconds: float = 0.0               # CPU time of the whole task (training and finishing)
    gpu_seconds: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)   # with `finish`: val/test scores
    probs: Any = None                      # with `finish.probs`: the test softmax (n, classes)
    saved: SavedModel | None = None        # with `finish`: the checkpoint written
    probs_url: str | None = None           # with `finish.probs_url`: where the test softmax went


# ---------------------------------------------------------------- phase steps

@dataclass
class Step:
    """What every phase step has: a name (for errors and events), the task to build, the worker's
    threads and GPU share."""
    name: str
    task: TaskSpec
    threads: int | None = None
    gpus: float = 0.0

    def run(self, on_epoch: EpochReport | None = None) -> Any:
        from workers.steps import run_step
        return run_step(self)


@dataclass
class StepOut:
    """What a step consumed (CPU time of its process, GPU wall-seconds x share, wall seconds)."""
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    seconds: float = 0.0


@dataclass
class Describe(Step):
    checkpoint: str | None = None          # model.checkpoint: read its metadata (None: none given)
    max_checkpoint_bytes: int | None = None
    ingredients: int = 1                   # a phase's ingredients (the soup step holds them all)


@dataclass
class TaskInfo(StepOut):
    metric: str = "accuracy"
    pretrained: bool = False
    steps_per_epoch: int = 1
    meta: dict[str, Any] = field(default_factory=dict)                 # what a checkpoint needs to rebuild the model
    checkpoint_meta: CheckpointMeta | None = None                      # the given checkpoint's own metadata
    memory_bytes: int | None = None        # a worker's estimated peak for this job's units (None: small)


@dataclass
class Curve:
    """A one-shot robustness curve (workers.robustness): the split scored and its points; None
    `points` when the task does not measure it."""
    split: str | None = None
    points: list[dict[str, float]] | None = None
    seconds: float = 0.0


@dataclass
class LoadModel(Step):
    """Phase 0 without training: the pretrained model (`source` None) or the checkpoint at `source`
    (its masks, or full ones), scored, its robustness curve over `grid`, saved to `url`."""
    source: str | None = None
    url: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    grid: list[float] = field(default_factory=list)
    recal_fraction: float = 0.0
    max_checkpoint_bytes: int | None = None


@dataclass
class Robustness(Step):
    url: str = ""
    grid: list[float] = field(default_factory=list)
    recal_fraction: float = 0.0


@dataclass
class ModelOut(StepOut):
    saved: SavedModel | None = None
    scores: dict[str, float] = field(default_factory=dict)
    curve: Curve | None = None


@dataclass
class Prune(Step):
    """Prune the model at `parent` to `target` (task.prune), score it, save it to `url`."""
    parent: str = ""
    url: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    target: float = 0.0
    scope: str = "global"
    criterion: str = "magnitude"
    seed: int = 0
    pattern: str = "unstructured"


@dataclass
class PruneOut(ModelOut):
    norm_drop: float = 0.0
    removed: int = 0
    notes: list[str] = field(default_factory=list)
    structure: dict[str, Any] | None = None      # channels: the task's `structure` report of the pruned model


@dataclass
class Soup(Step):
    """The soup of a phase from its ingredients' checkpoints (which share the mask of `pruned`):
    `method` uniform or greedy (by validation score; `val_scores`: the ingredients' own, where known),
    BatchNorm recalibrated over `recal_fraction`, scored, saved to `url`; the prediction ensemble from
    `probs` (the ingredients' saved test softmax; None entries are computed one model at a time)."""
    pruned: str = ""
    ingredients: list[str] = field(default_factory=list)
    ingredient_ids: list[str] = field(default_factory=list)      # their model ids: the soup's lineage in `meta`
    val_scores: list[float | None] = field(default_factory=list)
    probs: list[str | None] = field(default_factory=list)
    method: str = "uniform"
    recal_fraction: float = 0.0
    higher_is_better: bool = True
    url: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SoupOut(ModelOut):
    chosen: list[int] = field(default_factory=list)              # indices into Soup.ingredients
    greedy_score: float | None = None                            # the greedy soup's val score
    ingredient_scores: list[float] = field(default_factory=list)  # greedy: each ingredient's val score
    ensemble: float | None = None
    distances: list[float] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)       # soup (average, recalibration), eval
    structure: dict[str, Any] | None = None      # channels: the task's `structure` report of the soup


# ---------------------------------------------------------------- exports

@dataclass
class Export:
    """Build the export `fmt` (sparse, hf, onnx; workers.export) of the checkpoint at `model_uri`, read
    whole and checked against its recorded `size_bytes` and `sha256` first, and write it to `out_uri`
    (atomically). `name` says whose checkpoint it is in errors ("model <id>'s checkpoint")."""
    name: str
    model_uri: str
    size_bytes: int
    sha256: str
    fmt: str
    out_uri: str
    threads: int | None = None
    gpus: float = 0.0

    def run(self, on_epoch: EpochReport | None = None) -> ExportOut:
        from workers.steps import run_export
        return run_export(self)


@dataclass
class ExportOut(StepOut):
    """The export written: its size and sha256, and the peak RSS of the process that built it."""
    size_bytes: int = 0
    sha256: str = ""
    peak_rss_bytes: int = 0
