"""What a job will do, worked out from its spec before anything trains: the retraining config of
each ingredient and search trial, the seeds, the dense LR history the schedules follow, the epochs
progress counts, and the training tasks themselves. Pure functions of their arguments.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from typing import TYPE_CHECKING

from service.records import task_kind
from service.spec import MAX_EPOCHS, MAX_LR, JobSpec
from workers.config import PerpConfig, suggested_lr
from workers.schedules import dense_schedule, retrain_schedule
from workers.units import Finish, LMTask, TaskSpec, TrainTask

if TYPE_CHECKING:
    import torch

    from service.records import Task

# Seeds, derived from the job's seed so that a job is reproducible and its parts draw apart:
JOB_SEED_STRIDE = 1000       # job seeds s and s + 1 share no derived seed (below 10 phases)
PHASE_SEED_STRIDE = 100      # phase t's ingredients take seeds phase_seed + 0, 1, ... (up to 100)


def phase_seed(spec: JobSpec, phase: int) -> int:
    """The seed of phase `phase`'s first ingredient (the others add their index) and of its search:
    seed · JOB_SEED_STRIDE + phase · PHASE_SEED_STRIDE."""
    return spec.seed * JOB_SEED_STRIDE + phase * PHASE_SEED_STRIDE


def prune_seed(spec: JobSpec, phase: int) -> int:
    """The seed of phase `phase`'s pruning (the random criterion's draw): seed · JOB_SEED_STRIDE + phase."""
    return spec.seed * JOB_SEED_STRIDE + phase


@dataclass(frozen=True)
class RetrainConfig:
    """How one run retrains: its LR schedule with initial LR `lr` (ALLR, LLR...: see
    workers.schedules), its length, weight decay and seed."""
    schedule: str
    lr: float
    epochs: int
    weight_decay: float
    seed: int = 0

    def with_(self, **changes: Any) -> RetrainConfig:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.schedule} lr={self.lr:.3g} epochs={self.epochs} weight_decay={self.weight_decay:.2g}"


# A language model's retraining LR when the spec gives none (AdamW, PERP's order of magnitude)
LM_RETRAIN_LR = 1e-4


def retrain_config(spec: JobSpec, eta_max: float, seed: int = 0) -> RetrainConfig:
    """The spec's own retraining config (what a search starts from and may replace); its LR is
    `retrain.lr`, or `eta_max`, the dense run's peak LR (a language model: LM_RETRAIN_LR)."""
    default_lr = plan_of(spec).default_retrain_lr(eta_max)
    return RetrainConfig(schedule=spec.retrain.schedule, lr=spec.retrain.lr or default_lr, epochs=spec.retrain.epochs,
                         weight_decay=spec.retrain.optimizer.weight_decay, seed=seed)


def ingredient_settings(spec: JobSpec, phase: int, eta_max: float,
                        base: RetrainConfig | None = None) -> list[RetrainConfig]:
    """Per ingredient of `phase`: seed, schedule, weight_decay, epochs and initial LR.
    `base`: the retraining config to start from (a search's choice); default: the spec's.

    Only the `vary` hyperparameter differs. Derived values when `values` is null: seed -> distinct
    seeds; weight_decay -> log-spaced from wd/2 to 2 wd; retrain_epochs -> spread from E/2 to 3E/2;
    lr -> log-spaced from eta_max/2 to 2 eta_max (eta_max = retrain.lr or the dense peak LR).
    """
    m, soup = spec.soup.ingredients, spec.soup
    base = (base or retrain_config(spec, eta_max)).with_(seed=phase_seed(spec, phase))
    spread = [(i / (m - 1) if m > 1 else 0.5) for i in range(m)]     # 0..1
    out = []
    for i in range(m):
        v = soup.values[i] if soup.values is not None else None
        if soup.vary == "seed":
            c = base.with_(seed=int(v) if v is not None else base.seed + i)
        elif soup.vary == "weight_decay":
            c = base.with_(weight_decay=v if v is not None else base.weight_decay * 2 ** (2 * spread[i] - 1))
        elif soup.vary == "retrain_epochs":
            c = base.with_(epochs=int(v) if v is not None else max(1, round(base.epochs * (0.5 + spread[i]))))
        else:   # lr
            c = base.with_(lr=v if v is not None else base.lr * 2 ** (2 * spread[i] - 1))
        out.append(c)
    return out


def total_epochs(spec: JobSpec) -> int:
    """For progress: every epoch the job will train (a search's trials counted as if none stopped early)."""
    dense = 0 if spec.model.checkpoint or not plan_of(spec).trains_dense else spec.dense.epochs
    per_phase = sum(c.epochs for c in ingredient_settings(spec, 1, 1.0))
    search = 0
    if spec.search is not None:
        dim = spec.search.space.epochs
        trial_epochs = int(max(dim.values())) if dim is not None else spec.retrain.epochs
        searched = sum(spec.search.applies(t) for t in range(1, spec.prune.phases + 1))
        search = searched * spec.search.trials * trial_epochs
    return dense + per_phase * spec.prune.phases + search


MAX_DENSE_STEPS = 10_000_000      # a dense LR history longer than this is refused (1000 epochs of 10k steps)


def dense_history(meta: dict[str, Any]) -> tuple[list[float], int]:
    """The per-step dense LRs and dense epochs that a checkpoint's `dense_schedule` metadata records:
    either the steps themselves (`lrs`, with `epochs`) or the schedule that made them (`kind`, `lr`,
    `epochs`, `steps_per_epoch`, `warmup`). A checkpoint's metadata is its author's to write: every
    value is checked (types, finite, at most MAX_DENSE_STEPS steps) before any list is built. Raises
    KeyError/ValueError/TypeError naming what is malformed."""
    if not isinstance(meta, dict):
        raise TypeError("dense_schedule is not an object")
    epochs = meta["epochs"]
    if type(epochs) is not int or not 1 <= epochs <= MAX_EPOCHS:
        raise ValueError(f"epochs must be an integer in [1, {MAX_EPOCHS}]")
    if meta.get("lrs") is not None:
        raw = meta["lrs"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_DENSE_STEPS:
            raise ValueError(f"lrs must be a list of 1 to {MAX_DENSE_STEPS} learning rates")
        if not all(type(x) in (int, float) for x in raw):
            raise TypeError("lrs must hold numbers")
        lrs = [float(x) for x in raw]
    else:
        steps, lr, warmup = meta["steps_per_epoch"], meta["lr"], meta.get("warmup", 0.0)
        if type(steps) is not int or not 1 <= steps <= MAX_DENSE_STEPS // epochs:
            raise ValueError(f"steps_per_epoch must be an integer ≥ 1 with epochs × steps_per_epoch ≤ {MAX_DENSE_STEPS}")
        if type(lr) not in (int, float) or not 0 < lr <= MAX_LR:
            raise ValueError(f"lr must be a number in (0, {MAX_LR:g}]")
        if type(warmup) not in (int, float):
            raise TypeError("warmup must be a number")
        lrs = dense_schedule(str(meta["kind"])[:100], float(lr), epochs * steps, float(warmup))
    if not all(math.isfinite(x) and 0 <= x <= MAX_LR for x in lrs):
        raise ValueError(f"every learning rate must be finite and in [0, {MAX_LR:g}]")
    return lrs, epochs


# The retraining's SGD LR after an SFW dense run when retrain.lr is null and the zoo suggests none
SFW_RETRAIN_LR = 0.1


def dense_optimizer(spec: JobSpec) -> dict[str, Any]:
    """What the dense checkpoint records about the dense run's optimizer (`dense_optimizer` in its
    metadata): sgd with its settings, or sfw with its constraint, k, radius_factor, momentum, rescale."""
    return spec.dense.optimizer_config(spec.retrain.optimizer.config()).describe()


def retrain_peak_lr(spec: JobSpec, dense_lrs: list[float], optimizer: dict[str, Any] | None) -> float:
    """eta_max of the retraining schedules when retrain.lr is null: the dense run's peak LR, unless the
    dense run was SFW (`optimizer` name sfw), whose step size is no SGD learning rate: then the zoo's
    suggested LR for the arch (workers.models.suggested_lr), or SFW_RETRAIN_LR."""
    if (optimizer or {}).get("name") == "sfw":
        return suggested_lr(spec.model.arch) or SFW_RETRAIN_LR
    return max(dense_lrs)


def task_spec(spec: JobSpec) -> TaskSpec:
    """What a worker needs to build the job's task (its plan's `task_spec`): its model and data."""
    return plan_of(spec).task_spec(spec)


def make_task(spec: JobSpec, device: torch.device | None = None) -> Task:
    """The job's task, built in this process (imports torch: for workers and tests, not the driver)."""
    from workers.steps import build_task
    return build_task(task_spec(spec), device)


def dense_task(spec: JobSpec, lrs: list[float], finish: Finish) -> TrainTask:
    """Phase 0's dense training, budgeted by the spec's `dense` section (SGD with the retraining's
    settings, or SFW: `dense.optimizer`)."""
    data = spec.data.config()
    return TrainTask(name="dense", arch=spec.model.arch, model_kwargs=dict(spec.model.kwargs), data=data,
                     data_seed=spec.seed, lrs=lrs, epochs=spec.dense.epochs, seed=spec.seed,
                     optimizer=spec.dense.optimizer_config(spec.retrain.optimizer.config()), augment=data.augment,
                     finish=finish, keep_state=False,
                     gpus=spec.resources.gpus_per_ingredient)


@dataclass
class PhaseStart:
    """What every retraining of a phase starts from and follows: the pruned model (the URL of its
    checkpoint, which carries its masks), the pruning (per-phase rate, norm drop) and the dense run's
    LR history."""
    phase: int
    url: str
    rate: float
    norm_drop: float
    dense_lrs: list[float]
    dense_epochs: int
    steps_per_epoch: int


def retrain_task(spec: JobSpec, start: PhaseStart, name: str, config: RetrainConfig, info: dict[str, Any], *,
                 finish: Finish | None = None, resume_url: str | None = None) -> TrainTask | LMTask:
    """One retraining (an ingredient, or a search trial) of the pruned model with `config`, as the job's
    task plan makes it (ClassificationPlan.retrain_task, CausalLMPlan.retrain_task)."""
    return plan_of(spec).retrain_task(spec, start, name, config, info, finish=finish, resume_url=resume_url)


# ---------------------------------------------------------------- each task's plan

def _run_info(info: dict[str, Any], config: RetrainConfig, **more: Any) -> dict[str, Any]:
    """A retraining run's `info` (its RunRecord's config): the given info, the config's settings and `more`."""
    return dict(info, seed=config.seed, weight_decay=config.weight_decay, epochs=config.epochs, lr=config.lr, **more)


class ClassificationPlan:
    """How an image classification job is planned: a dense run first (unless a checkpoint is given),
    retraining with masked SGD on the schedule `config.schedule` over the dense LR history."""
    kind = "classification"
    trains_dense = True

    @staticmethod
    def default_retrain_lr(eta_max: float) -> float:
        """retrain.lr when the spec gives none: the dense run's peak LR."""
        return eta_max

    @staticmethod
    def task_spec(spec: JobSpec) -> TaskSpec:
        return TaskSpec(kind="classification", arch=spec.model.arch, data=spec.data.config(), seed=spec.seed,
                        model_kwargs=dict(spec.model.kwargs), structure=spec.prune.structure)

    @staticmethod
    def retrain_task(spec: JobSpec, start: PhaseStart, name: str, config: RetrainConfig, info: dict[str, Any], *,
                     finish: Finish | None = None, resume_url: str | None = None) -> TrainTask:
        """Its LR schedule comes from `config.schedule` over the dense history (workers.schedules)."""
        lrs = retrain_schedule(config.schedule, config.epochs * start.steps_per_epoch, start.dense_lrs, lr=config.lr,
                               norm_drop=start.norm_drop, rate=start.rate, phase_epochs=config.epochs,
                               dense_epochs=start.dense_epochs)
        opt = spec.retrain.optimizer.model_copy(update={"weight_decay": config.weight_decay}).config()
        info = _run_info(info, config, peak_lr=max(lrs), schedule=config.schedule)
        data = spec.data.config()
        return TrainTask(name=name, arch=spec.model.arch, model_kwargs=dict(spec.model.kwargs), data=data,
                         data_seed=spec.seed, lrs=lrs, epochs=config.epochs, seed=config.seed, init_url=start.url,
                         keep_state=False, optimizer=opt, params=spec.retrain.params, augment=data.augment,
                         threads=max(1, int(spec.resources.cpus_per_ingredient)), info=info, finish=finish,
                         gpus=spec.resources.gpus_per_ingredient, resume_url=resume_url)


class CausalLMPlan:
    """How a language-model job is planned: no dense run (phase 0 scores the pretrained model), PERP
    retraining (`retrain.params`) with AdamW at `config.lr` after a linear warm-up."""
    kind = "causal_lm"
    trains_dense = False

    @staticmethod
    def default_retrain_lr(eta_max: float) -> float:
        """retrain.lr when the spec gives none: LM_RETRAIN_LR (AdamW, PERP's order of magnitude)."""
        return LM_RETRAIN_LR

    @staticmethod
    def task_spec(spec: JobSpec) -> TaskSpec:
        return TaskSpec(kind="causal_lm", arch=spec.model.arch, data=spec.data.text_config(), seed=spec.seed,
                        model_kwargs=dict(spec.model.kwargs), structure=spec.prune.structure)

    @staticmethod
    def retrain_task(spec: JobSpec, start: PhaseStart, name: str, config: RetrainConfig, info: dict[str, Any], *,
                     finish: Finish | None = None, resume_url: str | None = None) -> LMTask:
        r = spec.retrain
        perp = PerpConfig(mode=r.params, lr=config.lr, weight_decay=config.weight_decay, epochs=config.epochs,
                          warmup_fraction=r.warmup, rank=r.rank, alpha=r.alpha, grad_accumulation=r.grad_accumulation,
                          gradient_checkpointing=r.gradient_checkpointing, seed=config.seed)
        info = _run_info(info, config, peak_lr=config.lr, schedule="linear warm-up", params=r.params)
        return LMTask(name=name, arch=spec.model.arch, data=spec.data.text_config(), data_seed=spec.seed, perp=perp,
                      init_url=start.url, keep_state=False, seed=config.seed, model_kwargs=dict(spec.model.kwargs),
                      threads=max(1, int(spec.resources.cpus_per_ingredient)), info=info, finish=finish,
                      gpus=spec.resources.gpus_per_ingredient)


PLANS = {plan.kind: plan for plan in (ClassificationPlan, CausalLMPlan)}


def plan_of(spec: JobSpec) -> type[ClassificationPlan] | type[CausalLMPlan]:
    """The job's task plan (by service.records.task_kind)."""
    return PLANS[task_kind(spec)]
