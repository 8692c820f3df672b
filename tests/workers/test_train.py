import pytest
import torch

from tests.workers.tiny import MODELS, batches
from workers.evaluate import evaluate
from workers.pruning import prune
from workers.train import OptimizerConfig, TrainingDiverged, check_learned, train, trainable_parameters

CPU = torch.device("cpu")


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("nesterov", [True, False])
def test_pruned_weights_and_momentum_stay_exactly_zero(arch, nesterov):
    torch.manual_seed(0)
    result = prune(MODELS[arch](), None, 0.6)
    model, masks = result.model, result.masks
    data = batches()
    opt_cfg = OptimizerConfig(momentum=0.9, weight_decay=5e-3, nesterov=nesterov)
    out = train(model, data, [0.2] * (3 * len(data)), epochs=3, optimizer=opt_cfg, masks=masks, device=CPU)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        w = params[name]
        assert torch.count_nonzero(w[~m]) == 0, name
        buf = out.optimizer.state[w]["momentum_buffer"]
        assert torch.count_nonzero(buf[~m]) == 0, name
        assert torch.count_nonzero(buf[m]) > 0, name        # the kept weights did train
    assert out.steps == 3 * len(data)


def test_training_learns_and_reports_every_epoch():
    torch.manual_seed(0)
    model, data = MODELS["mlp"](), batches(n=256)
    rows = []
    before = evaluate(model, data, device=CPU)["accuracy"]
    out = train(model, data, [0.1] * (5 * len(data)), epochs=5, val_loader=data, on_epoch=rows.append, device=CPU)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert rows[-1]["val_accuracy"] > max(0.6, before)
    assert out.history == rows


def test_bias_norm_trains_only_biases_and_norm_parameters():
    torch.manual_seed(0)
    model = MODELS["cnn"]()
    before = {k: v.clone() for k, v in model.named_parameters()}
    chosen = {id(p) for p in trainable_parameters(model, "bias_norm")}
    data = batches()
    train(model, data, [0.1] * len(data), epochs=1, params="bias_norm", device=CPU)
    for name, p in model.named_parameters():
        frozen = id(p) not in chosen
        assert frozen == (name.endswith("weight") and name.split(".")[0] in ("0", "3", "8")), name
        if frozen:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)
        else:
            assert not torch.equal(p, before[name]), name


def test_schedule_length_must_match():
    data = batches()
    with pytest.raises(ValueError, match="schedule has"):
        train(MODELS["mlp"](), data, [0.1] * 3, epochs=1, device=CPU)


def test_step_i_uses_lr_i():
    data = batches()
    seen = []
    train(MODELS["mlp"](), data, [0.01 * (i + 1) for i in range(2 * len(data))], epochs=2,
          on_epoch=lambda r: seen.append(r["lr"]), device=CPU)
    assert seen == pytest.approx([0.01 * len(data), 0.01 * 2 * len(data)])


def test_a_loss_that_turns_nan_stops_training_and_names_the_lr():
    torch.manual_seed(0)
    model, data = MODELS["mlp"](), batches(n=256)
    with pytest.raises(TrainingDiverged, match=r"learning rate 1e\+04"):
        train(model, data, [1e4] * (5 * len(data)), epochs=5, device=CPU)


def test_chance_level_is_divergence_and_a_learned_run_is_not():
    with pytest.raises(TrainingDiverged, match="chance level .* peak learning rate 0.3"):
        check_learned({"train_accuracy": 0.104, "val_accuracy": 0.098}, 0.1, peak_lr=0.3)
    check_learned({"train_accuracy": 0.104, "val_accuracy": 0.45}, 0.1, peak_lr=0.3)   # val learned something
    check_learned({"train_accuracy": 0.9}, 0.1, peak_lr=0.3)
