"""Causal language modelling as a pipeline task (design section 6b), beside workers.classification:
a pretrained Hugging Face model (`hf:<dir>`, or a GGUF file in it) on text cut into token blocks.

primary metric   test perplexity exp(mean next-token cross-entropy), lower is better
                 (`{split}_perplexity`, `{split}_loss`, `{split}_tokens_per_second`)
phase 0          the pretrained model as it is (scored, not trained)
pruning          magnitude, Wanda or SparseGPT over the linear layers inside the transformer blocks,
                 unstructured or N:M, calibrated block by block on `calibration_samples` training
                 blocks (workers.llm_prune); norm drop d = ||theta - theta_pruned|| / ||theta|| over
                 every weight and bias (SparseGPT also moves the weights it keeps)
retraining       PERP (workers.perp): only biases/norms (/head), or adapters that keep the mask
recalibration    none (no BatchNorm); no prediction ensemble (the soup and ingredients are compared)
robustness       not measured: the one-shot curve (workers.robustness) is defined for image classifiers

`LMTask` is the retraining unit an executor runs (`run_lm_task`), as workers.tasks.TrainTask is for
image models; both return a workers.tasks.TrainOutcome.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.checkpoint import save_model
from workers.lm import load_causal_lm, perplexity
from workers.llm_prune import prunable_lm_names, prune_causal_lm
from workers.perp import PerpConfig, retrain_lm
from workers.pruning import Masks, PruneResult, weight_and_bias_norm_sq
from workers.text import TextConfig, TextSplits, block_loader, calibration_blocks, load_text_splits
from workers.units import LMTask  # noqa: F401  (defined without torch)

State = dict[str, torch.Tensor]


def lm_scores(model: nn.Module, splits: TextSplits, batch_size: int, device: torch.device) -> dict[str, float]:
    """{val,test}_{perplexity,loss,tokens_per_second} over the splits that have blocks."""
    out: dict[str, float] = {}
    for name in ("val", "test"):
        blocks = getattr(splits, name)
        if len(blocks):
            r = perplexity(model, blocks, batch_size=batch_size, device=device)
            out.update({f"{name}_perplexity": r["perplexity"], f"{name}_loss": r["loss"],
                        f"{name}_tokens_per_second": r["tokens_per_second"]})
    return out


def lm_masks(model: nn.Module) -> Masks:
    """All-True masks over the prunable weights (the blocks' linear layers)."""
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_lm_names(model)}


@dataclass
class CausalLM:
    """A pretrained causal LM `arch` (`hf:<dir>`, `model_kwargs`: gguf_file, dtype) on the text `data`,
    split by `seed`, on `device`. The model is loaded once; `build` copies it."""
    arch: str
    data: TextConfig
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    metric: str = "perplexity"
    ensembles: bool = False                  # a prediction ensemble is measured
    pretrained: bool = True

    def __post_init__(self) -> None:
        self.base, self.tokenizer = load_causal_lm(self.arch, **self.model_kwargs)
        self.base.eval()
        self.splits = load_text_splits(self.data, self.tokenizer, self.seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits.train) / self.data.batch_size)

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the model: the pretrained model it was made from."""
        return {"arch": self.arch, "model_kwargs": dict(self.model_kwargs), "task": "causal_lm",
                "seq_len": self.data.seq_len}

    def build(self, state: State | None = None) -> nn.Module:
        m = copy.deepcopy(self.base)
        if state is not None:
            m.load_state_dict(state)
        return m.to(self.device)

    def full_masks(self, model: nn.Module) -> Masks:
        return lm_masks(model)

    def scores(self, model: nn.Module) -> dict[str, float]:
        return lm_scores(model, self.splits, self.data.batch_size, self.device)

    def val_score(self, model: nn.Module) -> float:
        """Validation perplexity (greedy soups rank by it, lower is better)."""
        return perplexity(model, self.splits.val, batch_size=self.data.batch_size, device=self.device)["perplexity"]

    def recalibrate(self, model: nn.Module, fraction: float) -> nn.Module:
        return model

    def test_probs(self, model: nn.Module) -> None:
        return None

    def ensemble(self, probs: list[Any]) -> None:
        return None

    def robustness(self, model: nn.Module, sparsities: Any, fraction: float) -> None:
        """Not supported: the one-shot robustness curve is an image-classifier measurement (accuracy after
        global magnitude pruning of every conv/linear weight). Pruning a language model that way would
        also prune its head and tied embeddings, which this task never prunes, and eight test perplexity
        passes of a pretrained LM cost more than the rest of a phase 0; the pipeline says it skipped it."""
        return None

    def prune(self, model: nn.Module, masks: Masks, target: float, *, scope: str, criterion: str,
              seed: int, pattern: str = "unstructured") -> PruneResult:
        """`criterion` (magnitude | wanda | sparsegpt) to `target` with `pattern`, on a copy of `model`;
        the calibration blocks are drawn from train with `seed`."""
        pruned = copy.deepcopy(model)                 # `model`, untouched, is the "before" of the norm drop
        calibration = calibration_blocks(self.splits, self.data.calibration_samples, seed)
        r = prune_causal_lm(pruned, calibration, target, criterion=criterion, pattern=pattern, masks=masks,
                            device=self.device)
        before, after = model.state_dict(), pruned.state_dict()
        diff_sq = sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in before
                      if k.endswith(("weight", "bias")))
        norm_sq = weight_and_bias_norm_sq(model)
        removed = sum(int((~m).sum()) for m in r.masks.values()) - sum(int((~m).sum()) for m in masks.values())
        return PruneResult(model=pruned, masks=r.masks, removed=removed,
                           norm_drop=math.sqrt(diff_sq / norm_sq) if norm_sq > 0 else 0.0)


def run_lm_task(task: LMTask, on_epoch: Callable[[dict[str, float]], None] | None = None,
                device: torch.device | None = None):
    """Load the model, retrain it the PERP way from `init_state` keeping `masks`, score it on val and
    test (and save it) with `finish`; returns a workers.tasks.TrainOutcome."""
    from workers.tasks import TrainOutcome, load_cached
    from workers.train import default_device
    start, cpu_start = time.perf_counter(), time.process_time()
    device = device or default_device()
    if task.threads:
        torch.set_num_threads(task.threads)
    model, tokenizer = load_causal_lm(task.arch, **task.model_kwargs)
    masks = task.masks
    if task.init_url is not None:
        start_ckpt = load_cached(task.init_url)
        model.load_state_dict(start_ckpt.state)
        masks = masks if masks is not None else start_ckpt.masks
    else:
        model.load_state_dict(task.init_state)
    splits = load_text_splits(task.data, tokenizer, task.data_seed)
    batches = block_loader(splits.train, task.data.batch_size, shuffle=True, seed=task.seed)

    def record(row: dict[str, float]) -> None:
        row["cpu_seconds"] = time.process_time() - cpu_start
        if device.type == "cuda":
            row["gpu_seconds"] = (time.perf_counter() - start) * (task.gpus or 1.0)
        if on_epoch is not None:
            on_epoch(row)

    result = retrain_lm(model, batches, task.perp, masks, device=device, on_epoch=record,
                        val_blocks=block_loader(splits.val, task.data.batch_size, shuffle=False) if len(splits.val)
                        else None)
    out = TrainOutcome(name=task.name, state={}, history=result.history, steps=result.steps,
                       train_seconds=result.train_seconds, seconds=0.0, epochs_trained=task.perp.epochs)
    if task.finish is not None:
        out.scores = dict(lm_scores(model, splits, task.data.batch_size, device),
                          trainable_share=result.trainable_share, sparsity_lost=result.sparsity_lost,
                          train_tokens_per_second=result.tokens_per_second)
        out.saved = save_model(task.finish.url, model, masks, task.finish.meta)
    if task.keep_state:
        out.state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out.seconds = time.perf_counter() - start
    out.cpu_seconds = time.process_time() - cpu_start
    out.gpu_seconds = out.seconds * (task.gpus or 1.0) if device.type == "cuda" else 0.0
    return out

