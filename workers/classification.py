"""Image classification as a pipeline task (design section 6b): what the phase loop needs to know
about the model and the data, behind one interface (service.records.Task) that causal language
modelling implements too.

primary metric   test accuracy, higher is better (`{split}_accuracy`, with `{split}_loss`, `{split}_ece`)
recalibration    BatchNorm running statistics re-estimated on the first `fraction` of the unshuffled
                 train split (a model without BatchNorm is left as it is)
ensemble         argmax of the ingredients' mean test softmax
pruning          magnitude (or random) over every conv and linear weight, global or per layer; or N:M
                 (`prune.pattern: "2:4"`) along the input channels, in one phase (workers.pruning.prune_nm);
                 or, with `structure` channels, whole channels (workers.structured.prune_channels)
robustness       one-shot curve of a dense model (workers.robustness): test accuracy after global
                 magnitude pruning to each sparsity of a grid (of channels, with `structure` channels),
                 BatchNorm recalibrated, no retraining
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workers.config import TASK_OPTIONS, TaskOptions
from workers.data import DataConfig, Splits, load_splits, make_loader
from workers.evaluate import ensemble_accuracy, evaluate, score_splits
from workers.models import build_model
from workers.pruning import Masks, PruneResult, full_masks, prune
from workers.robustness import one_shot_curve
from workers.soup import bn_recalibrate
from workers.structured import prune_channels, structure_report


@dataclass
class Classification:
    """An image classifier `arch` on the dataset `data`, split by `seed`, on `device`."""
    arch: str
    data: DataConfig
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    metric: str = "accuracy"
    ensembles: bool = True                  # a prediction ensemble is measured
    pretrained: bool = False               # phase 0 trains the dense model (unless the spec gives a checkpoint)
    structure: str = "unstructured"         # prune.structure: single weights | whole channels
    # what it implements (its criteria, its retraining params), declared in workers.config.TASK_OPTIONS
    options: ClassVar[TaskOptions] = TASK_OPTIONS["classification"]
    splits: Splits = field(init=False)

    def __post_init__(self) -> None:
        self.splits = load_splits(self.data, self.seed)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader("train", shuffle=True))

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the model."""
        return {"arch": self.arch, "model_kwargs": dict(self.model_kwargs), "num_classes": self.splits.num_classes,
                "in_shape": list(self.splits.in_shape)}

    def memory_estimate(self, ingredients: int) -> int | None:
        """None: an image model's worker needs no more memory than Ray gives a worker by default."""
        return None

    def build(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        m = build_model(self.arch, num_classes=self.splits.num_classes, in_shape=self.splits.in_shape,
                        **self.model_kwargs)
        if state is not None:
            m.load_state_dict(state)
        return m.to(self.device)

    def loader(self, split: str, shuffle: bool = False):
        return make_loader(getattr(self.splits, split), self.data.batch_size, shuffle=shuffle)

    def scores(self, model: nn.Module) -> dict[str, float]:
        """{val,test}_{accuracy,loss,ece} over the splits that have examples."""
        return score_splits(model, self.splits, self.data.batch_size, device=self.device)[0]

    def val_score(self, model: nn.Module) -> float:
        """Validation accuracy (greedy soups rank by it)."""
        return evaluate(model, self.loader("val"), device=self.device)["accuracy"]

    def recalibrate(self, model: nn.Module, fraction: float) -> nn.Module:
        return bn_recalibrate(model, self.loader("train"), fraction, device=self.device)

    def test_probs(self, model: nn.Module) -> torch.Tensor | None:
        """The test split's softmax (for the prediction ensemble)."""
        return evaluate(model, self.loader("test"), device=self.device, probs=True).get("probs")

    def ensemble(self, probs: list[torch.Tensor | None]) -> float | None:
        """Test accuracy of the ingredients' prediction ensemble; None without a test split or probs."""
        if not len(self.splits.test) or not probs or any(p is None for p in probs):
            return None
        return ensemble_accuracy(probs, self.splits.test.y)

    def full_masks(self, model: nn.Module) -> Masks:
        """All-True masks over every conv and linear weight."""
        return full_masks(model)

    def example(self, model: nn.Module) -> torch.Tensor:
        """One zero input of the data's shape on the model's device (what the channel graph is traced with)."""
        return torch.zeros(1, *self.splits.in_shape, device=next(model.parameters()).device)

    def prune(self, model: nn.Module, masks: Masks, target: float, *, scope: str, criterion: str,
              seed: int, pattern: str = "unstructured") -> PruneResult:
        if self.structure == "channels":
            return prune_channels(model, masks, target, example_input=self.example(model), scope=scope,
                                  criterion=criterion, generator=torch.Generator().manual_seed(seed))
        return prune(model, masks, target, scope=scope, criterion=criterion, seed=seed, pattern=pattern)

    def structure_report(self, model: nn.Module, masks: Masks) -> dict[str, Any]:
        """workers.structured.structure_report: channels removed, parameters and MACs before and after."""
        return structure_report(model, masks, self.example(model))

    def robustness(self, model: nn.Module, sparsities: Sequence[float], fraction: float) -> dict[str, Any] | None:
        """The one-shot robustness curve of the dense `model` (workers.robustness.one_shot_curve):
        accuracy on the test split (the val split when there is no test split) after global magnitude
        pruning to each of `sparsities` (with `structure` channels: removing that share of the channels) and
        BatchNorm recalibration on the first `fraction` of the unshuffled train split.
        `{"split": "test", "points": [{"sparsity", "accuracy", "accuracy_raw"}]}`."""
        split = "test" if len(self.splits.test) else "val"
        x = self.example(model)
        prune_fn = ((lambda m, s: prune_channels(m, None, s, example_input=x, scope="global").model)
                    if self.structure == "channels" else None)
        points = one_shot_curve(model, self.loader(split), self.loader("train"), sparsities=sparsities,
                                bn_fraction=fraction, device=self.device, prune_fn=prune_fn)
        return {"split": split, "points": points}
