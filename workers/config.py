"""The workers' plain data: configs, errors, records and small pure helpers that the driver and the
API use without importing torch or numpy (design section 9: a thin driver). Each name is re-exported
by the module that works with it (workers.data.DataConfig is this DataConfig), so callers import it
from either place. Nothing here may import torch: tests/service/test_thin_driver.py checks it.
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.criteria import SCORES as IMAGE_SCORES
from workers.files import is_url, local_copy

TEXT_FIELD = "data"                 # the spec section text settings live in, as error messages name it

# ---------------------------------------------------------------- from workers.checkpoint

@dataclass
class SavedModel:
    """Where a model's checkpoint went and the figures the store keeps about it."""
    uri: str
    size_bytes: int
    sha256: str
    sparsity: float
    nonzeros: int
    parameters: int
    layer_sparsity: dict[str, float]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or fails its integrity check."""


def _typed(header: dict[str, Any], key: str, kind: type) -> Any:
    """header[key] when it is None or a `kind` (a bool is no int); CheckpointError naming the key otherwise."""
    value = header.get(key)
    if value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    raise CheckpointError(f"checkpoint metadata: {key} is {type(value).__name__}, expected {kind.__name__}")


@dataclass(frozen=True)
class CheckpointMeta:
    """What a model checkpoint's `ladle` header says of it, typed (workers.checkpoint checks it on every
    save and gives it on every load as `Checkpoint.info`): how to rebuild the model (arch, task, model
    kwargs, classes and input shape, or a language model's sequence length), where it comes from (model id,
    kind, phase, name, job, its lineage `parents`, the job's spec) and the dense model's training history
    (`dense_schedule`, `dense_optimizer`: kept as written, checked where they are used, since a user's
    checkpoint may carry anything there). Keys it does not name are kept in the header as they are."""
    arch: str | None = None
    task: str = "classification"                   # classification | causal_lm
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    in_shape: tuple[int, ...] | None = None
    seq_len: int | None = None
    model_id: str | None = None
    kind: str | None = None                         # dense | pruned | ingredient | soup
    phase: int | None = None
    name: str | None = None
    job: str | None = None
    parents: tuple[dict[str, Any], ...] = ()        # ({"id": model id, "kind": edge kind}, ...)
    spec: dict[str, Any] | None = None
    dense_schedule: Any = None
    dense_optimizer: Any = None

    @classmethod
    def of(cls, header: dict[str, Any]) -> CheckpointMeta:
        """The typed view of a header; CheckpointError names a key of the wrong type."""
        in_shape = _typed(header, "in_shape", list)
        if in_shape is not None and not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in in_shape):
            raise CheckpointError("checkpoint metadata: in_shape is not a list of positive integers")
        parents = _typed(header, "parents", list) or []
        if not all(isinstance(p, dict) and isinstance(p.get("id"), str) for p in parents):
            raise CheckpointError("checkpoint metadata: parents is not a list of {id, kind} objects")
        return cls(arch=_typed(header, "arch", str), task=_typed(header, "task", str) or "classification",
                   model_kwargs=dict(_typed(header, "model_kwargs", dict) or {}),
                   num_classes=_typed(header, "num_classes", int), seq_len=_typed(header, "seq_len", int),
                   in_shape=None if in_shape is None else tuple(in_shape),
                   model_id=_typed(header, "model_id", str), kind=_typed(header, "kind", str),
                   phase=_typed(header, "phase", int), name=_typed(header, "name", str), job=_typed(header, "job", str),
                   parents=tuple(parents), spec=_typed(header, "spec", dict),
                   dense_schedule=header.get("dense_schedule"), dense_optimizer=header.get("dense_optimizer"))

    @property
    def structure(self) -> str:
        """prune.structure of the job that made it (unstructured when it names none)."""
        prune = (self.spec or {}).get("prune")
        value = prune.get("structure") if isinstance(prune, dict) else None
        return value if value in STRUCTURES else "unstructured"

    @property
    def parent(self) -> str | None:
        """The first parent's model id (a pruned model's dense model, an ingredient's pruned model)."""
        return self.parents[0]["id"] if self.parents else None

# ---------------------------------------------------------------- from workers.models

class ModelError(ValueError):
    """An unknown architecture, or one that cannot be built with these arguments."""


# A peak dense LR (SGD, momentum 0.9, batch 64-128, with the dense warm-up) that trains each zoo model
# without diverging: lenet5 has no normalisation and diverged at 0.1 on Fashion-MNIST for one seed in
# three (every run at chance), so it gets less; the BatchNorm nets take the papers' 0.1.
SUGGESTED_LR: dict[str, float] = {"mlp": 0.1, "lenet5": 0.05, "resnet20": 0.1, "resnet56": 0.1, "vgg16_bn": 0.05}


def suggested_lr(arch: str) -> float | None:
    """The zoo's working peak dense LR for `arch` (None outside the zoo)."""
    return SUGGESTED_LR.get(arch)


IMPORT_PREFIX = "import:"


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_import(arch: str) -> tuple[str, str]:
    """(module, callable) of ``import:<module>:<callable>``, checked for form only (nothing is imported):
    both dotted Python names, and no part of the callable's path a dunder (``__globals__`` and the like)."""
    parts = arch.split(":")
    if len(parts) != 3 or parts[0] != IMPORT_PREFIX[:-1] or not parts[1] or not parts[2]:
        raise ModelError(f"arch {arch!r} must look like import:<module>:<callable>")
    _, module_name, attr = parts
    if not _DOTTED.fullmatch(module_name):
        raise ModelError(f"arch {arch!r}: {module_name!r} is not a Python module name (dotted identifiers)")
    if not _DOTTED.fullmatch(attr) or any(name.startswith("__") for name in attr.split(".")):
        raise ModelError(f"arch {arch!r}: {attr!r} is not a callable's name (dotted identifiers, no dunders)")
    return module_name, attr

# ---------------------------------------------------------------- from workers.lm.model

HF_PREFIX = "hf:"


def is_causal_lm(arch: object) -> bool:
    """True when `arch` names a causal language model (``hf:<local dir>``)."""
    return isinstance(arch, str) and arch.startswith(HF_PREFIX)

# ---------------------------------------------------------------- from workers.data

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "npz",
                             "synthetic")


NEEDS_PATH: frozenset[str] = frozenset({"imagefolder", "npz"})


AUGMENTED_BY_DEFAULT: frozenset[str] = frozenset({"cifar10", "cifar100"})


class DataError(ValueError):
    """A dataset that is unknown, missing or malformed."""


def default_augment(name: str) -> bool:
    """The papers' augmentation default for dataset `name`: True (random crop after padding by
    min(H, W) // 8, plus a horizontal flip of 3-channel images) for cifar10 / cifar100; False for mnist,
    fashion_mnist, digits, npz, synthetic and imagefolder."""
    return name in AUGMENTED_BY_DEFAULT


@dataclass(frozen=True)
class DataConfig:
    """What to load. `augment` None means the dataset's default (`default_augment`); it is resolved on
    construction, so `DataConfig(...).augment` is always a bool."""

    name: str = "digits"
    path: str | None = None
    val_fraction: float = 0.1
    batch_size: int = 128
    augment: bool | None = None

    def __post_init__(self) -> None:
        if self.augment is None:
            object.__setattr__(self, "augment", default_augment(self.name))

# ---------------------------------------------------------------- from workers.lm.text

GLOB_CHARS = frozenset("*?[")


TEXT_SUFFIX = ".txt"


class TextError(ValueError):
    """Text that is missing, empty, too short for the blocks asked for, or settings that cannot work."""


@dataclass(frozen=True)
class TextConfig:
    """What text to read and how to cut it. `path`: a file, a folder (every *.txt under it) or a glob;
    `seq_len`: tokens per block; `calibration_samples`: training blocks for calibration (pruning statistics);
    `val_fraction` / `test_fraction`: shares of the blocks held out (see `split_counts`); `max_tokens`: keep only
    the first that many tokens (None: all); `batch_size`: blocks per batch."""

    path: str
    seq_len: int = 128
    calibration_samples: int = 32
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_tokens: int | None = None
    batch_size: int = 8


MAX_TEXT_FILES = 10_000        # files one text path may stand for
MAX_GLOB_SECONDS = 10.0        # time one text path's expansion may take
MAX_RECURSIVE = 1              # `**` in one glob: each more multiplies the walk


def _bounded(paths: Iterable[Path], path: str, deadline: float, found: set[Path]) -> set[Path]:
    """`found` with `paths` added; TextError once more than MAX_TEXT_FILES are found or the deadline passes."""
    for p in paths:
        found.add(p)
        if len(found) > MAX_TEXT_FILES:
            raise TextError(f"{TEXT_FIELD}.path {path!r} stands for more than {MAX_TEXT_FILES} files; "
                            "name fewer (a narrower folder or glob)")
        _in_time(path, deadline)
    return found


def _in_time(path: str, deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TextError(f"{TEXT_FIELD}.path {path!r} took more than {MAX_GLOB_SECONDS:g} s to list; "
                        "name fewer files (a narrower folder or glob)")


def _txt_under(folder: Path, path: str = "", deadline: float | None = None,
               found: set[Path] | None = None) -> set[Path]:
    deadline = time.monotonic() + MAX_GLOB_SECONDS if deadline is None else deadline
    return _bounded((p for p in folder.rglob(f"*{TEXT_SUFFIX}") if p.is_file()), path or str(folder), deadline,
                    set() if found is None else found)


def text_files(path: str) -> list[Path]:
    """The files `path` stands for: the file itself; every *.txt under a folder, recursively, sorted by path;
    or the matches of a glob pattern (``**`` at most once), sorted by path, each matched folder replaced by
    its *.txt files. Raises `TextError` naming `path` when it matches no file, more than MAX_TEXT_FILES, or
    takes more than MAX_GLOB_SECONDS to list."""
    if not isinstance(path, str) or not path.strip():
        raise TextError(f"{TEXT_FIELD}.path must name a text file, a folder of *.txt files or a glob, got {path!r}")
    if is_url(path):                      # an upload in a remote artifact store: one file, fetched
        try:
            return [local_copy(path)]
        except OSError as e:
            raise TextError(f"{TEXT_FIELD}.path: cannot read {path!r} ({e})") from e
    expanded = os.path.expanduser(path)
    target = Path(expanded)
    deadline = time.monotonic() + MAX_GLOB_SECONDS
    if target.is_file():
        return [target]
    if target.is_dir():
        files = _txt_under(target, path, deadline)
        if not files:
            raise TextError(f"{TEXT_FIELD}.path {path!r} is a folder without *{TEXT_SUFFIX} files (searched recursively)")
        return sorted(files)
    if not GLOB_CHARS & set(expanded):
        raise TextError(f"{TEXT_FIELD}.path {path!r} does not exist")
    if sum(part == "**" for part in target.parts) > MAX_RECURSIVE or expanded.count("**") > MAX_RECURSIVE:
        raise TextError(f"{TEXT_FIELD}.path {path!r} has more than one '**': at most one may span folders")
    found: set[Path] = set()
    for match in glob.iglob(expanded, recursive=True):
        _in_time(path, deadline)
        p = Path(match)
        if p.is_dir():
            _txt_under(p, path, deadline, found)
        elif p.is_file():
            _bounded([p], path, deadline, found)
    if not found:
        raise TextError(f"{TEXT_FIELD}.path {path!r} matches no file")
    return sorted(found)

# ---------------------------------------------------------------- from workers.pruning

class PruningError(ValueError):
    """Pruning was asked for something impossible (bad rate, masks that don't fit the model)."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" with 0 < N < M (e.g. "2:4", "4:8") -> (N, M)."""
    text = str(pattern).strip().lower()
    if text == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return n, m
    raise PruningError(f"unknown sparsity pattern {pattern!r}; known: 'unstructured' or 'N:M' with 0 < N < M "
                       "(e.g. '2:4')")


def per_phase_rate(target_sparsity: float, phases: int) -> float:
    """p = 1 - (1 - S)^(1/T): the fraction of remaining weights each of T phases removes."""
    if not 0.0 <= target_sparsity < 1.0:
        raise PruningError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if phases < 1:
        raise PruningError(f"phases must be at least 1, got {phases}")
    return 1.0 - (1.0 - target_sparsity) ** (1.0 / phases)


def sparsity_after(rate: float, phase: int) -> float:
    """Sparsity after `phase` phases of per-phase rate p: 1 - (1 - p)^t."""
    return 1.0 - (1.0 - rate) ** phase

# ---------------------------------------------------------------- from workers.robustness

SPARSITIES: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


MAX_POINTS = 32


def check_sparsities(sparsities: Iterable[float]) -> list[float]:
    """The grid sorted and deduplicated; every value must lie in [0, 1), at most MAX_POINTS of them."""
    grid = sorted({float(s) for s in sparsities})
    bad = [s for s in grid if not 0.0 <= s < 1.0]
    if bad:
        raise PruningError(f"robustness sparsities must lie in [0, 1), got {bad}")
    if len(grid) > MAX_POINTS:
        raise PruningError(f"at most {MAX_POINTS} robustness sparsities, got {len(grid)}")
    return grid

# ---------------------------------------------------------------- from workers.train

class TrainingDiverged(RuntimeError):
    """Training produced a NaN/infinite loss, or ended at chance level: the learning rate is too high
    (or the data carries no signal)."""


@dataclass(frozen=True)
class OptimizerConfig:
    """name sgd: SGD with `momentum`, `weight_decay`, `nesterov`; name sfw: Stochastic Frank-Wolfe over
    per-tensor constraint sets (workers.sfw; `sfw` holds its config, the other fields are unused)."""
    name: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    sfw: SFWConfig | None = None

    def describe(self) -> dict:
        """What a checkpoint records about the optimizer."""
        if self.name == "sfw":
            return {"name": "sfw", **(self.sfw or SFWConfig()).as_dict()}
        return {"name": self.name, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov}

# ---------------------------------------------------------------- from workers.sfw

CONSTRAINTS = ("k_support", "l1", "l2", "linf", "k_sparse", "group_k_support", "group_l1")


# the group constraints (one group per output channel / row of a conv or linear weight) and the per-entry
# kind a tensor with fewer than 2 dimensions (a bias, a BatchNorm parameter) gets under them
GROUP_CONSTRAINTS = {"group_k_support": "k_support", "group_l1": "l1"}


RESCALES = ("gradient", "diameter", "none")


@dataclass(frozen=True)
class SFWConfig:
    """constraint: one of CONSTRAINTS; k: the fraction of each tensor's entries a k-sparse / k-support
    vertex has (group_k_support: the fraction of a weight's output channels / rows, its groups, that a
    vertex has, best about the share of channels meant to survive; its biases and norm parameters get
    k_support with the fraction of their entries); radius_factor: the L2 diameter is 2 · radius_factor ·
    the expected init norm; momentum: μ of d ← μ d + ∇; rescale: the step-size rule (module docstring)."""
    constraint: str = "k_support"
    k: float = 0.05
    radius_factor: float = 10.0
    momentum: float = 0.9
    rescale: str = "gradient"

    def __post_init__(self) -> None:
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"unknown SFW constraint {self.constraint!r}; known: {', '.join(CONSTRAINTS)}")
        if self.rescale not in RESCALES:
            raise ValueError(f"unknown SFW rescale {self.rescale!r}; known: {', '.join(RESCALES)}")
        if not 0 < self.k <= 1:
            raise ValueError(f"SFW k is a fraction of each layer's parameters in (0, 1], got {self.k}")
        if self.radius_factor <= 0:
            raise ValueError(f"SFW radius_factor must be positive, got {self.radius_factor}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"SFW momentum must be in [0, 1), got {self.momentum}")

    def as_dict(self) -> dict:
        return asdict(self)

# ---------------------------------------------------------------- from workers.lm.perp

PERP_MODES = ("bias_norm", "bias_norm_head", "lora", "mask_lora", "scale_lora", "all")


ADAPTER_MODES = ("lora", "mask_lora", "scale_lora")


AUTOCAST_MODES = ("auto", "bf16", "off")


class PerpError(ValueError):
    """PERP retraining was asked for something it cannot do (unknown mode, masks that don't fit)."""


def _check_adapter_args(rank: int, alpha: float, dropout: float) -> None:
    if rank < 1:
        raise PerpError(f"the LoRA rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise PerpError(f"the LoRA alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise PerpError(f"the LoRA dropout must be in [0, 1), got {dropout}")


@dataclass(frozen=True)
class PerpConfig:
    """Hyperparameters of `retrain_lm`.

    lr: AdamW's peak learning rate; weight_decay: AdamW's decoupled decay on every trainable tensor;
    warmup_fraction: w = round(warmup_fraction * T) of the T optimizer steps warm up;
    grad_accumulation: micro-batches per optimizer step; max_grad_norm: clip the global gradient
    norm to this (None: no clipping); rank / alpha / dropout: the adapters' r, alpha and dropout;
    gradient_checkpointing: recompute activations in the backward pass (None: on the CPU only); autocast: "auto" (bf16 on
    CUDA when supported, else off), "bf16" (CUDA only) or "off"; seed: adapters' init and dropout.
    """
    mode: str = "mask_lora"
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 1
    warmup_fraction: float = 0.1
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    gradient_checkpointing: bool | None = None      # None: on on the CPU, off on CUDA
    autocast: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in PERP_MODES:
            raise PerpError(f"unknown PERP mode {self.mode!r}; known: {', '.join(PERP_MODES)}")
        if not self.lr > 0:
            raise PerpError(f"the learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise PerpError(f"the weight decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise PerpError(f"epochs must be at least 1, got {self.epochs}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise PerpError(f"the warm-up fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.grad_accumulation < 1:
            raise PerpError(f"grad_accumulation must be at least 1, got {self.grad_accumulation}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PerpError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.autocast not in AUTOCAST_MODES:
            raise PerpError(f"unknown autocast {self.autocast!r}; known: {', '.join(AUTOCAST_MODES)}")
        _check_adapter_args(self.rank, self.alpha, self.dropout)


# ---------------------------------------------------------------- the options each task implements

LM_CRITERIA = ("magnitude", "wanda", "sparsegpt")     # workers.lm.prune (calibrated block by block)
IMAGE_PARAMS = ("all", "bias_norm")                    # workers.train.trainable_parameters


# prune.structure: unstructured (single weights, or an N:M pattern) | channels (whole channels; language models:
# MLP neurons and attention KV groups) | neurons (language models: MLP neurons only, attention kept whole)
STRUCTURES = ("unstructured", "channels", "neurons")


@dataclass(frozen=True)
class TaskOptions:
    """What a task implements, declared once here (torch-free): the job spec builds its choices and its
    checks from these, and the workers refuse anything else. `criteria`: prune.criterion; `retrain_params`:
    retrain.params."""
    criteria: tuple[str, ...]
    retrain_params: tuple[str, ...]
    structures: tuple[str, ...] = ("unstructured", "channels")      # prune.structure
    channel_criteria: tuple[str, ...] = ()             # the criteria prune.structure channels ranks groups by


TASK_OPTIONS: dict[str, TaskOptions] = {
    # channels: output channels of convs / neurons of linear layers (workers.structured)
    "classification": TaskOptions(criteria=tuple(IMAGE_SCORES), retrain_params=IMAGE_PARAMS,
                                  channel_criteria=("magnitude", "random")),
    # channels: MLP neurons and attention KV groups (workers.lm.structured)
    "causal_lm": TaskOptions(criteria=LM_CRITERIA, retrain_params=PERP_MODES, structures=STRUCTURES,
                             channel_criteria=("magnitude", "wanda")),
}

