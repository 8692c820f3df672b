"""The job spec: what a user submits (JSON or YAML). Every field has a sensible default.

Validation errors name the field (pydantic's `loc`), e.g. ``prune.target_sparsity: must be < 1``.

What a spec may name (code, files, models) depends on the operator's settings and on who submits it: the
validation context carries a `service.access.Access` (``parse_spec(data, access=...)``, or
``JobSpec.model_validate(data, context={"access": ...})``); see service/access.py.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from service.access import Access, access_of
from service.records import task_kind
from workers.config import (DATASETS, IMPORT_PREFIX, NEEDS_PATH, DataConfig, DataError, ModelError, OptimizerConfig,
                            SFWConfig, CONSTRAINTS, STRUCTURES, TASK_OPTIONS, TextConfig, TextError, is_causal_lm, parse_pattern, text_files)
from workers.files import is_url
from workers.config import MAX_POINTS as ROBUSTNESS_MAX_POINTS
from workers.config import SPARSITIES as ROBUSTNESS_SPARSITIES
from workers.config import check_sparsities
from workers.schedules import DENSE_SCHEDULES, RETRAIN_SCHEDULES

MAX_INGREDIENTS = 64
MAX_EPOCHS = 1000
MAX_PHASES = 50
MAX_TRIALS = 200
MAX_LR = 10.0                # every learning rate a spec gives (dense.lr, retrain.lr, soup values)
MAX_WEIGHT_DECAY = 1.0
# Bounds on what a spec may hold (it is stored with the job and shown in every job page)
MAX_STRING = 4096            # characters of any string field (paths, names, archs)
MAX_LIST = 256               # items of any list field
MAX_KWARGS_BYTES = 4096      # model.kwargs as JSON


class _Strict(BaseModel):
    # every float finite by type (NaN and infinities are refused wherever a spec comes from)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        if isinstance(v, str):
            if "\x00" in v:
                raise ValueError("must not contain NUL characters")
            if len(v) > MAX_STRING:
                raise ValueError(f"is {len(v)} characters long; at most {MAX_STRING}")
        if isinstance(v, list) and len(v) > MAX_LIST:
            raise ValueError(f"has {len(v)} items; at most {MAX_LIST}")
        return v


class ModelSpec(_Strict):
    arch: str = "mlp"
    checkpoint: str | None = None          # a Ladle checkpoint (.safetensors) to start from instead of dense training
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _small_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(v, default=str))
        if size > MAX_KWARGS_BYTES:
            raise ValueError(f"is {size} bytes as JSON; at most {MAX_KWARGS_BYTES}")
        return v

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str, info: ValidationInfo) -> str:
        access = access_of(info.context)
        if access.stored:
            return v
        if is_causal_lm(v):                # its folder under the data roots; checked with its kwargs below
            folder = v.removeprefix("hf:")
            return "hf:" + access.path("model.arch", folder) if folder.strip() else v
        from workers.models import check_arch      # torch: not for a driver (Access.of_stored)
        try:
            check_arch(v)
            if v.startswith(IMPORT_PREFIX):
                access.check_import(v)     # the allow-list; nothing is imported here
        except ModelError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _causal_lm_exists(self, info: ValidationInfo) -> ModelSpec:
        """`hf:<dir>`: a local Hugging Face folder (or a GGUF file in it, `kwargs.gguf_file`); the only
        kwargs are gguf_file and dtype, and trust_remote_code is refused."""
        if is_causal_lm(self.arch):
            if self.checkpoint is not None:
                raise ValueError("model.checkpoint is for image models; a language model starts from its hf: folder")
            if access_of(info.context).stored:
                return self
            from workers.lm.model import check_causal_lm      # torch: not for a driver
            try:
                check_causal_lm(self.arch, **self.kwargs)
            except ModelError as e:
                raise ValueError(str(e)) from None
        return self

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_readable(cls, v: str | None, info: ValidationInfo) -> str | None:
        """The caller's own model (model:<id>, which becomes its artifact URL, or that URL) or a file under
        the data roots (see service.access); a local file must exist."""
        if v is None:
            return v
        access = access_of(info.context)
        v = access.checkpoint(v)
        if access.trusted and "://" not in v and not Path(v).expanduser().is_file():
            raise ValueError(f"checkpoint file {v!r} does not exist")
        return v


class DataSpec(_Strict):
    """The dataset (see workers/data.py)::

        data:
          name: digits          # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagefolder | npz | synthetic
          path: null            # required by imagefolder / npz; for the others, the only place looked in when given
          val_fraction: 0.1     # of the training split, stratified, drawn with the job's seed
          batch_size: 128
          augment: null         # null: the dataset's default; true / false overrides it

    A dataset that is not there is a 422 at submission naming data.name (or data.path) and how to get
    it: fashion_mnist comes with Debian's package dataset-fashion-mnist; mnist, cifar10 and cifar100 are
    read from $LADLE_DATA or ~/.ladle/data (never downloaded).
    Default augmentation (the papers'): random crop after padding by 4 pixels (min(H, W) // 8) plus a
    horizontal flip for cifar10 / cifar100; none for mnist, fashion_mnist, digits, npz, synthetic and
    imagefolder. `config().augment` is the resolved bool.
    """

    name: str = "digits"
    path: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, le=0.5)
    batch_size: int = Field(128, ge=1, le=65536)
    augment: bool | None = None
    # text (language-model jobs): `path` is a file, a folder (every *.txt under it) or a glob; the text is
    # tokenized with the model's tokenizer into blocks of seq_len tokens (workers.lm.text); batch_size
    # counts blocks (8 when not given)
    seq_len: int = Field(128, ge=2, le=32768)
    calibration_samples: int = Field(32, ge=1, le=4096)
    test_fraction: float = Field(0.05, ge=0.0, le=0.5)
    max_tokens: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in (*DATASETS, "text"):
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(DATASETS)}, text")
        return v

    @field_validator("path")
    @classmethod
    def _path_readable(cls, v: str | None, info: ValidationInfo) -> str | None:
        """Under the data roots (service.access), resolved; a text glob's files too."""
        if v is None:
            return v
        access = access_of(info.context)
        if info.data.get("name") == "text":
            return access.text_path("data.path", v)
        return access.path("data.path", v)

    @model_validator(mode="after")
    def _path_exists(self, info: ValidationInfo) -> DataSpec:
        if (self.name in NEEDS_PATH or self.name == "text") and not self.path:
            raise ValueError(f"dataset {self.name!r} needs data.path")
        access = access_of(info.context)
        if access.stored:
            return self
        if self.name == "text":
            if self.path in access.texts:       # listed already by the access check
                if access.texts[self.path] is not None:
                    raise ValueError(access.texts[self.path])
                return self
            try:
                if not is_url(self.path):       # a URL: an upload, checked when it was sent
                    text_files(self.path)
            except TextError as e:
                raise ValueError(str(e)) from None
            return self
        if self.path and not is_url(self.path) and not Path(self.path).expanduser().exists():
            raise ValueError(f"data.path {self.path!r} does not exist")
        from workers.data import check_data      # numpy and torch: not for a driver
        try:
            check_data(self.config())
        except DataError as e:
            raise ValueError(str(e)) from None
        return self

    def text_config(self) -> TextConfig:
        """The workers' TextConfig of a text dataset."""
        return TextConfig(path=self.path or "", seq_len=self.seq_len, calibration_samples=self.calibration_samples,
                          val_fraction=self.val_fraction, test_fraction=self.test_fraction, max_tokens=self.max_tokens,
                          batch_size=self.batch_size if "batch_size" in self.model_fields_set else 8)

    def config(self) -> DataConfig:
        """The workers' DataConfig, with `augment` resolved to a bool (null: the dataset's default)."""
        return DataConfig(name=self.name, path=self.path, val_fraction=self.val_fraction,
                          batch_size=self.batch_size, augment=self.augment)


class SFWSpec(_Strict):
    """Compression-aware dense training with Stochastic Frank-Wolfe (workers.sfw): every parameter
    tensor stays in its own `constraint` set (k_support | l1 | l2 | linf | k_sparse, or, for robustness to
    removing whole filters, group_k_support | group_l1: the k-support / L1 norm over the L2 norms of each
    weight's output channels) whose L2 diameter is 2 · `radius_factor` · the tensor's expected init norm;
    `k` is the fraction of each tensor's entries (of its output channels, for the group kinds: pick about the
    share of channels meant to survive) that a vertex of k_support / k_sparse / group_k_support has; `rescale` turns the schedule's LR into the step size γ
    (gradient: γ = min(lr ‖d‖ / ‖θ − v‖, 1); diameter: min(lr / D, 1); none: min(lr, 1))."""
    constraint: Literal[CONSTRAINTS] = "k_support"
    k: float = Field(0.05, gt=0.0, le=1.0)
    radius_factor: float = Field(10.0, gt=0.0, le=1e4)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    rescale: Literal["gradient", "diameter", "none"] = "gradient"

    def config(self) -> SFWConfig:
        return SFWConfig(**self.model_dump())


class DenseSpec(_Strict):
    """Budgeted dense training: `epochs` at peak `lr` (workers.models.suggested_lr lists one that works
    per zoo architecture), a linear warm-up over the first `warmup` share of the steps, then `schedule`.
    `optimizer`: sgd (retrain.optimizer's SGD settings, as the retraining uses) or sfw (Stochastic
    Frank-Wolfe with the `sfw` settings: a dense model robust to pruning; `lr` is then SFW's step size
    before rescaling, which is no SGD learning rate, so the retraining peaks at retrain.lr or, when that
    is null, at the zoo's SGD LR for the arch: service.plan.retrain_peak_lr)."""
    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    lr: float = Field(0.1, gt=0.0, le=MAX_LR)
    schedule: Literal[DENSE_SCHEDULES] = "linear"  # type: ignore[valid-type]
    warmup: float = Field(0.05, ge=0.0, le=0.5)
    optimizer: Literal["sgd", "sfw"] = "sgd"
    sfw: SFWSpec = SFWSpec()

    @model_validator(mode="after")
    def _sfw(self) -> DenseSpec:
        if self.optimizer != "sfw" and self.sfw != SFWSpec():
            raise ValueError("dense.sfw is only used with dense.optimizer sfw")
        if self.optimizer == "sfw" and self.sfw.rescale == "none" and self.lr > 1.0:
            raise ValueError(f"dense.lr {self.lr:g} is SFW's step size with dense.sfw.rescale none: at most 1")
        return self

    def optimizer_config(self, sgd: OptimizerConfig) -> OptimizerConfig:
        """The dense run's optimizer: `sgd` (the retraining's SGD settings) or SFW."""
        if self.optimizer == "sfw":
            return OptimizerConfig(name="sfw", momentum=self.sfw.momentum, weight_decay=0.0, nesterov=False,
                                   sfw=self.sfw.config())
        return sgd


def _choices(kind: str) -> tuple[str, ...]:
    """Every value of one option that some task implements (workers.config.TASK_OPTIONS), in order."""
    return tuple(dict.fromkeys(v for options in TASK_OPTIONS.values() for v in getattr(options, kind)))


CRITERIA = _choices("criteria")
RETRAIN_PARAMS = _choices("retrain_params")


class PruneSpec(_Strict):
    """criterion: one the job's task implements (workers.config.TASK_OPTIONS: image models magnitude |
    random; language models magnitude | wanda | sparsegpt, calibrated on `data.calibration_samples`
    blocks); pattern: unstructured, or N:M (e.g. "2:4", "4:8")
    for both: at most N nonzeros in every M consecutive input channels of each conv and linear weight
    (language models: of the blocks' linear layers), reached in one phase, so phases must be 1 and
    target_sparsity 1 - N/M (both may be left out: they are then set so); `scope` does not apply to N:M.
    structure: unstructured (single weights), or channels: whole groups leave the model (image models:
    output channels of convs and neurons of linear layers, with every layer coupled to them, as
    torch_pruning's dependency graph finds them; language models: MLP neurons and attention KV groups,
    the same number in every layer), ranked by their L2 norm (magnitude), at random (image models) or by
    Wanda's activation-weighted score (language models); `target_sparsity` is then the share of the
    prunable channels (groups) removed, and exports (onnx, hf, compact) come out physically smaller.
    neurons (language models): MLP neurons only, attention kept whole."""
    target_sparsity: float = Field(0.9, ge=0.0, lt=1.0)
    phases: int = Field(3, ge=1, le=MAX_PHASES)
    scope: Literal["global", "layerwise"] = "global"
    criterion: Literal[CRITERIA] = "magnitude"
    pattern: str = "unstructured"
    structure: Literal[STRUCTURES] = "unstructured"

    @field_validator("pattern")
    @classmethod
    def _known_pattern(cls, v: str) -> str:
        try:
            nm = parse_pattern(v)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"

    @model_validator(mode="before")
    @classmethod
    def _derived_target(cls, data: Any) -> Any:
        """An N:M pattern without a target_sparsity gets 1 - N/M (and, without phases, one phase)."""
        if isinstance(data, dict) and "pattern" in data:
            try:
                nm = parse_pattern(data["pattern"])
            except (ValueError, TypeError):
                return data                    # the field validator names the problem
            if nm is not None:
                data = dict(data)
                data.setdefault("target_sparsity", 1 - nm[0] / nm[1])
                data.setdefault("phases", 1)
        return data

    @model_validator(mode="after")
    def _pattern(self) -> PruneSpec:
        nm = parse_pattern(self.pattern)
        if nm is not None and self.phases != 1:
            raise ValueError(f"pattern {self.pattern} is reached in one phase: phases must be 1, not {self.phases}")
        if nm is not None and self.structure != "unstructured":
            raise ValueError(f"prune.structure {self.structure} removes whole groups; prune.pattern {self.pattern} "
                             f"keeps N of every M weights: choose one (structure unstructured, or pattern unstructured)")
        if nm is not None and abs(self.target_sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"pattern {self.pattern} prunes exactly {1 - nm[0] / nm[1]:g} of the weights: "
                             f"target_sparsity must be that (or left out), not {self.target_sparsity:g}")
        return self

    robustness: list[float] | None = Field(default_factory=lambda: list(ROBUSTNESS_SPARSITIES),
                                           max_length=ROBUSTNESS_MAX_POINTS)

    @field_validator("robustness")
    @classmethod
    def _robustness(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return None
        try:
            return check_sparsities(v) or None
        except ValueError as e:
            raise ValueError(str(e)) from None


class OptimizerSpec(_Strict):
    name: Literal["sgd"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=MAX_WEIGHT_DECAY)
    nesterov: bool = True

    def config(self) -> OptimizerConfig:
        return OptimizerConfig(**self.model_dump())


class RetrainSpec(_Strict):
    epochs: int = Field(5, ge=1, le=MAX_EPOCHS)
    schedule: Literal[RETRAIN_SCHEDULES] = "llr"  # type: ignore[valid-type]
    lr: float | None = Field(None, gt=0.0, le=MAX_LR)
    optimizer: OptimizerSpec = OptimizerSpec()
    # all | bias_norm; for language models (PERP) also bias_norm_head, lora, mask_lora, scale_lora
    params: Literal[RETRAIN_PARAMS] = "all"
    rank: int = Field(8, ge=1, le=1024)            # lora / mask_lora / scale_lora adapters
    alpha: float = Field(16.0, gt=0.0, le=4096)
    warmup: float = Field(0.1, ge=0.0, lt=1.0)     # language models: AdamW's linear warm-up share
    grad_accumulation: int = Field(1, ge=1, le=1024)   # language models: micro-batches per step
    # language models: recompute activations in the backward pass (less memory, ~25 % more time); null: on
    # where a worker trains on the CPU (a SmolLM2-135M ingredient peaks at 2.4 GB instead of 3.5), off on a GPU
    gradient_checkpointing: bool | None = None


class SoupSpec(_Strict):
    ingredients: int = Field(4, ge=1, le=MAX_INGREDIENTS)
    vary: Literal["seed", "weight_decay", "retrain_epochs", "lr"] = "seed"
    values: list[float] | None = None
    method: Literal["uniform", "greedy"] = "uniform"
    bn_recalibration_fraction: float = Field(0.2, ge=0.0, le=1.0)
    min_ingredients: int = Field(2, ge=1, le=MAX_INGREDIENTS)

    @model_validator(mode="after")
    def _consistent(self) -> SoupSpec:
        if self.min_ingredients > self.ingredients:
            raise ValueError(f"min_ingredients ({self.min_ingredients}) exceeds ingredients ({self.ingredients})")
        if self.values is not None:
            if len(self.values) != self.ingredients:
                raise ValueError(f"values has {len(self.values)} entries, one per ingredient ({self.ingredients}) needed")
            if self.vary == "retrain_epochs" and any(v != int(v) or not 1 <= v <= MAX_EPOCHS for v in self.values):
                raise ValueError(f"values for retrain_epochs must be whole numbers in [1, {MAX_EPOCHS}]")
            if self.vary == "lr" and any(not 0 < v <= MAX_LR for v in self.values):
                raise ValueError(f"values for lr must be in (0, {MAX_LR:g}]")
            if self.vary == "weight_decay" and any(not 0 <= v <= MAX_WEIGHT_DECAY for v in self.values):
                raise ValueError(f"values for weight_decay must be in [0, {MAX_WEIGHT_DECAY:g}]")
        return self


class Dimension(_Strict):
    """One searched hyperparameter: exactly one of `choice` (a list), `uniform` [low, high],
    `loguniform` [low, high] (both > 0) or `randint` [low, high] (whole numbers, both included)."""
    choice: list[str | float] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint")
        if self.choice is not None and not self.choice:
            raise ValueError("choice must not be empty")
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] <= bounds[1]:
                raise ValueError(f"{kind} bounds must be [low, high] with low <= high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    def values(self) -> list[Any]:
        """The bounds or choices, for range checks."""
        return list(self.choice if self.choice is not None else
                    next(b for b in (self.uniform, self.loguniform, self.randint) if b is not None))


class SearchSpace(_Strict):
    """What the search varies; whatever is left out stays as `retrain` sets it."""
    schedule: Dimension | None = None
    lr: Dimension | None = None
    epochs: Dimension | None = None
    weight_decay: Dimension | None = None

    @field_validator("schedule")
    @classmethod
    def _schedules(cls, dim: Dimension | None) -> Dimension | None:
        if dim is not None and (dim.choice is None or any(v not in RETRAIN_SCHEDULES for v in dim.choice)):
            raise ValueError(f"must be a choice among {', '.join(RETRAIN_SCHEDULES)}")
        return dim

    @field_validator("lr", "weight_decay", "epochs")
    @classmethod
    def _numbers(cls, dim: Dimension | None, info: ValidationInfo) -> Dimension | None:
        if dim is None:
            return dim
        if any(isinstance(v, str) for v in dim.values()):
            raise ValueError("takes numbers")
        if not all(math.isfinite(v) for v in dim.values()):
            raise ValueError("values must be finite numbers")
        low, high = min(dim.values()), max(dim.values())
        if info.field_name == "lr" and not (0 < low and high <= 10):
            raise ValueError(f"values must be in (0, 10], not [{low:g}, {high:g}]")
        if info.field_name == "weight_decay" and not (0 <= low and high <= 1):
            raise ValueError(f"values must be in [0, 1], not [{low:g}, {high:g}]")
        if info.field_name == "epochs" and (dim.uniform is not None or dim.loguniform is not None
                                            or any(v != int(v) for v in dim.values())
                                            or not 1 <= low <= high <= MAX_EPOCHS):
            raise ValueError(f"must be whole numbers in [1, {MAX_EPOCHS}] (a choice or randint)")
        return dim

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One config: a value per dimension given (choice: uniform over the list; loguniform:
        uniform in log space; randint: both ends included)."""
        out: dict[str, Any] = {}
        for name in ("schedule", "lr", "epochs", "weight_decay"):
            dim: Dimension | None = getattr(self, name)
            if dim is None:
                continue
            if dim.choice is not None:
                v = rng.choice(dim.choice)
            elif dim.uniform is not None:
                v = rng.uniform(*dim.uniform)
            elif dim.loguniform is not None:
                v = math.exp(rng.uniform(math.log(dim.loguniform[0]), math.log(dim.loguniform[1])))
            else:
                v = rng.randint(*dim.randint)
            out[name] = int(v) if name == "epochs" else v
        return out

    @model_validator(mode="after")
    def _not_empty(self) -> SearchSpace:
        if not any((self.schedule, self.lr, self.epochs, self.weight_decay)):
            raise ValueError("the search space is empty: name at least one of schedule, lr, epochs, weight_decay")
        return self


class SearchSpec(_Strict):
    """A Ray Tune search over the retraining schedule before a phase's ingredients. Trial 0 is the
    spec's own retraining config; the other trials sample the space. ASHA stops weak trials early."""
    space: SearchSpace
    trials: int = Field(8, ge=1, le=MAX_TRIALS)
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: Literal["val_accuracy", "val_loss", "train_accuracy", "train_loss", "val_perplexity"] = "val_accuracy"
    phases: Literal["first", "all"] | list[int] = "first"
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS)          # ASHA: epochs before a trial may be stopped
    reduction_factor: int = Field(2, ge=2, le=16)              # ASHA: keep the best 1/reduction_factor per rung

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.metric.endswith("accuracy") else "min"     # loss, perplexity: lower is better

    def applies(self, phase: int) -> bool:
        if self.phases == "all":
            return True
        return phase == 1 if self.phases == "first" else phase in self.phases


class ResourcesSpec(_Strict):
    cpus_per_ingredient: float = Field(1.0, gt=0.0, le=256)
    gpus_per_ingredient: float = Field(0.0, ge=0.0, le=16)


_TASK_NAMES = {"classification": "image models", "causal_lm": "language models (model.arch hf:<dir>)"}


class JobSpec(_Strict):
    name: str = Field("job", min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    model: ModelSpec = Field(default_factory=ModelSpec)     # made when needed: checking one imports torch
    data: DataSpec = Field(default_factory=DataSpec)
    dense: DenseSpec = DenseSpec()
    prune: PruneSpec = PruneSpec()
    retrain: RetrainSpec = RetrainSpec()
    soup: SoupSpec = SoupSpec()
    search: SearchSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    # Wall-clock seconds from the job's start (the first driver's) after which it fails with that
    # reason and its driver is stopped; what it finished is kept. None: no limit
    timeout: float | None = Field(None, gt=0, le=30 * 24 * 3600)

    @model_validator(mode="after")
    def _one_task(self) -> JobSpec:
        """A language-model job has an hf: model and text data, and uses only what PERP retraining and
        calibrated pruning mean for it; an image job uses none of those."""
        lm, text = is_causal_lm(self.model.arch), self.data.name == "text"
        if lm != text:
            raise ValueError("a language-model job needs both model.arch hf:<dir> and data.name text"
                             if lm else "data.name text needs a language model (model.arch hf:<dir>)")
        kind = task_kind(self)
        options, where = TASK_OPTIONS[kind], _TASK_NAMES[kind]
        for field, value, offered in (("prune.criterion", self.prune.criterion, options.criteria),
                                      ("retrain.params", self.retrain.params, options.retrain_params)):
            if value not in offered:
                others = " or ".join(_TASK_NAMES[k] for k, o in TASK_OPTIONS.items()
                                     if value in (o.criteria if field == "prune.criterion" else o.retrain_params))
                raise ValueError(f"{field} {value} is for {others}; {where} take {', '.join(offered)}")
        if self.prune.structure not in options.structures:
            raise ValueError(f"prune.structure {self.prune.structure} is for language models; {where} take "
                             f"{', '.join(options.structures)}")
        if self.prune.structure != "unstructured" and self.prune.criterion not in options.channel_criteria:
            raise ValueError(f"prune.criterion {self.prune.criterion} ranks single weights; with prune.structure "
                             f"{self.prune.structure} {where} take {', '.join(options.channel_criteria)}")
        if lm:
            if self.search is not None and "accuracy" in self.search.metric:
                raise ValueError(f"search.metric {self.search.metric} is for image models; use val_perplexity or "
                                 f"val_loss")
        elif self.search is not None and self.search.metric == "val_perplexity":
            raise ValueError("search.metric val_perplexity is for language models")
        return self

    @model_validator(mode="after")
    def _model_size(self, info: ValidationInfo) -> JobSpec:
        """An image model (not ``import:``: its code is the workers' to import) built on the meta device for
        the data's shape (nothing allocated), its parameters counted: at most Access.max_model_parameters
        (LADLE_MAX_MODEL_PARAMETERS). Kwargs that do not build it are refused here, not on a worker."""
        access = access_of(info.context)
        limit = access.max_model_parameters
        if access.trusted or is_causal_lm(self.model.arch) or self.model.arch.startswith(IMPORT_PREFIX):
            return self
        from workers.models import count_parameters      # torch: not for a driver
        try:
            n = count_parameters(self.model.arch, self.data.name, **self.model.kwargs)
        except ModelError as e:
            raise ValueError(f"model.kwargs: {e}") from None
        if limit is not None and n > limit:
            raise ValueError(f"model.kwargs: {self.model.arch} with these kwargs has {n:,} parameters, more than "
                             f"this service's limit of {limit:,} (LADLE_MAX_MODEL_PARAMETERS)")
        return self

    @model_validator(mode="after")
    def _greedy_needs_validation(self) -> JobSpec:
        if self.soup.method == "greedy" and self.data.val_fraction == 0:
            raise ValueError("soup.method greedy ranks ingredients on the validation split: "
                             "data.val_fraction must be > 0")
        if self.search is not None:
            if self.search.metric.startswith("val_") and self.data.val_fraction == 0:
                raise ValueError(f"search.metric {self.search.metric} needs a validation split: "
                                 "data.val_fraction must be > 0")
            if isinstance(self.search.phases, list) and not all(1 <= p <= self.prune.phases for p in self.search.phases):
                raise ValueError(f"search.phases must be phases in [1, {self.prune.phases}]")
        return self


class SpecError(ValueError):
    """A job spec that does not validate; `errors` lists (field, message) pairs, `details` pydantic's own
    errors (loc as a tuple, msg, type, input, ctx) when there are any."""

    def __init__(self, errors: list[tuple[str, str]], details: list[dict[str, Any]] | None = None):
        self.errors = errors
        self.details = details or []
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in errors))


def _errors(e: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        out.append((loc, msg))
    return out


def parse_spec(data: dict[str, Any] | None, *, access: Access | None = None) -> JobSpec:
    """Validate a spec given as a dict; raise SpecError naming each bad field. `access`: what the spec may name
    (the API's caller and settings); None: the settings' checks (`get_settings()`) with no caller."""
    try:
        return JobSpec.model_validate(data or {}, context={"access": access} if access is not None else None)
    except ValidationError as e:
        raise SpecError(_errors(e), e.errors(include_url=False)) from None


def load_spec(path: str | Path, *, access: Access | None = None) -> JobSpec:
    """Read a YAML or JSON job spec file (`access`: as for `parse_spec`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError([("file", f"cannot read {path}: {e.strerror}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([("file", f"{path} is not valid YAML/JSON: {e}")]) from None
    if data is not None and not isinstance(data, dict):
        raise SpecError([("file", f"{path} must hold a mapping of spec fields, not {type(data).__name__}")])
    return parse_spec(data, access=access)
