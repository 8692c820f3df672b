"""Causal language modelling as a pipeline task (design section 6b), beside workers.classification:
a pretrained Hugging Face model (`hf:<dir>`, or a GGUF file in it) on text cut into token blocks.

primary metric   test perplexity exp(mean next-token cross-entropy), lower is better
                 (`{split}_perplexity`, `{split}_loss`, `{split}_tokens_per_second`)
phase 0          the pretrained model as it is (scored, not trained)
pruning          magnitude, Wanda or SparseGPT over the linear layers inside the transformer blocks,
                 unstructured or N:M, calibrated block by block on `calibration_samples` training
                 blocks (workers.lm.prune); norm drop d = ||theta - theta_pruned|| / ||theta|| over
                 every weight and bias (SparseGPT also moves the weights it keeps); with `structure`
                 channels, whole MLP neurons and attention KV groups, the same number in every layer
                 (magnitude or Wanda's activation-weighted group score: workers.lm.structured)
retraining       PERP (workers.lm.perp): only biases/norms (/head), or adapters that keep the mask
recalibration    none (no BatchNorm); no prediction ensemble (the soup and ingredients are compared)
robustness       not measured: the one-shot curve (workers.robustness) is defined for image classifiers

`LMTask` is the retraining unit an executor runs (`run_lm_task`), as workers.tasks.TrainTask is for
image models; both return a workers.tasks.TrainOutcome.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workers.config import TASK_OPTIONS, TaskOptions
from workers.checkpoint import save_model
from workers.lm.model import causal_lm_skeleton, load_causal_lm, perplexity
from workers.lm.prune import prunable_lm_names, prune_causal_lm
from workers.lm.structured import lm_structure_report, prune_lm_structured
from workers.lm.perp import retrain_lm
from workers.pruning import Masks, PruneResult, weight_and_bias_norm_sq
from workers.lm.text import TextConfig, TextSplits, block_loader, calibration_blocks, load_text_splits
from workers.units import LMTask  # noqa: F401  (defined without torch)

State = dict[str, torch.Tensor]

# A worker's memory estimate (CausalLM.memory_estimate): the process with torch and transformers loaded,
# copies of the weights a unit holds at its peak, copies of one batch's logits
LM_WORKER_BASE = 1 << 30
LM_TRAIN_COPIES = 3
LM_LOGIT_COPIES = 4


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
    structure: str = "unstructured"         # prune.structure: single weights | neurons and KV groups | neurons
    # what it implements (its criteria, its retraining params), declared in workers.config.TASK_OPTIONS
    options: ClassVar[TaskOptions] = TASK_OPTIONS["causal_lm"]

    def __post_init__(self) -> None:
        # the architecture without its weights (`build` fills it), and the buffers a state dict leaves out
        self.skeleton, self.tokenizer = causal_lm_skeleton(self.arch, **self.model_kwargs)
        self.splits = load_text_splits(self.data, self.tokenizer, self.seed)
        saved = set(self.skeleton.state_dict())
        self._buffers = {n: b.clone() for n, b in self.skeleton.named_buffers() if n not in saved}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits.train) / self.data.batch_size)

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the model: the pretrained model it was made from."""
        return {"arch": self.arch, "model_kwargs": dict(self.model_kwargs), "task": "causal_lm",
                "seq_len": self.data.seq_len}

    def memory_estimate(self, ingredients: int) -> int:
        """A worker's peak for this job's units, in bytes:

            LM_WORKER_BASE + W · max(LM_TRAIN_COPIES, ingredients + 2) + LM_LOGIT_COPIES · B · L · V · 4

        W: the weights' bytes (float32); training holds the model, its gradients' and optimizer's share
        and the merged adapters (LM_TRAIN_COPIES), the soup step every ingredient plus the soup and a
        candidate; B · L · V: one batch's logits over the vocabulary (kept, shifted, log-softmax and
        their gradients). Measured against bench/perp.py (design section 9)."""
        weights = sum(p.numel() * 4 for p in self.skeleton.parameters())
        vocab = int(getattr(self.skeleton.config, "vocab_size", 0) or 0)
        logits = LM_LOGIT_COPIES * self.data.batch_size * self.data.seq_len * vocab * 4
        return int(LM_WORKER_BASE + weights * max(LM_TRAIN_COPIES, ingredients + 2) + logits)

    def build(self, state: State | None = None) -> nn.Module:
        """The pretrained model (read again: the task keeps no weights), or the model with `state`. The
        model takes `state`'s tensors as its own (no copy, so one model in memory, not two): give it a
        state that nothing else changes, and do not change the model's weights in place unless the state
        is yours (training loads a fresh one)."""
        if state is None:
            m, _ = load_causal_lm(self.arch, **self.model_kwargs)
            return m.to(self.device)
        m = copy.deepcopy(self.skeleton)
        m.load_state_dict(state, assign=True)
        for name, buf in self._buffers.items():
            owner, _, leaf = name.rpartition(".")
            m.get_submodule(owner).register_buffer(leaf, buf.clone(), persistent=False)
        if getattr(m.config, "tie_word_embeddings", False) and hasattr(m, "tie_weights"):
            m.tie_weights()                    # a checkpoint keeps the tied head as a tensor of its own
        return m.eval().to(self.device)

    def full_masks(self, model: nn.Module) -> Masks:
        return lm_masks(model)

    def structure_report(self, model: nn.Module, masks: Masks) -> dict[str, Any]:
        """workers.lm.structured.lm_structure_report (MACs per token over `seq_len`-token blocks)."""
        return lm_structure_report(model, masks, self.data.seq_len)

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
        if self.structure != "unstructured":         # its own norm drop and removed count; masks over the same names
            return prune_lm_structured(pruned, masks, target, criterion=criterion,
                                       calibration=calibration if criterion == "wanda" else None,
                                       heads=self.structure == "channels", device=self.device)
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
    from workers.checkpoint import load
    from workers.steps import build_task
    from workers.tasks import RunClock, TrainOutcome, cpu_state, tune_allocator
    from workers.units import TaskSpec
    tune_allocator()
    clock = RunClock(task, device)
    device = clock.device
    # the job's task (tokenizer, token blocks, the model's skeleton) as this worker's steps use it
    lm = build_task(TaskSpec(kind="causal_lm", arch=task.arch, data=task.data, seed=task.data_seed,
                             model_kwargs=dict(task.model_kwargs)), device)
    masks = task.masks
    if task.init_url is not None:
        start_ckpt = load(task.init_url)            # its own copy: training changes the weights in place
        state, masks = start_ckpt.state, (masks if masks is not None else start_ckpt.masks)
        del start_ckpt
    else:
        state = {k: v.clone() for k, v in task.init_state.items()}
    model = lm.build(state)
    del state
    splits = lm.splits
    batches = block_loader(splits.train, task.data.batch_size, shuffle=True, seed=task.seed)

    def record(row: dict[str, float]) -> None:
        clock.stamp(row)
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
        out.state = cpu_state(model)
    del model, result
    return clock.finish(out)

