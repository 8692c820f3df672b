"""The local pipeline end to end on real data (scikit-learn's digits)."""

import pytest

from service.artifacts import ArtifactStore
from service.executors import SequentialExecutor
from service.pipeline import PhaseFailed, Pipeline
from service.plan import ingredient_settings
from service.recorders import DBRecorder, LocalRecorder
from service.spec import parse_spec
from workers.checkpoint import load
from workers.pruning import per_phase_rate, sparsity_after

CHANCE = 0.1   # digits has 10 classes

SMALL = {"name": "t", "data": {"batch_size": 64}, "dense": {"epochs": 6, "lr": 0.1},
         "prune": {"target_sparsity": 0.8, "phases": 2}, "retrain": {"epochs": 2, "schedule": "llr"},
         "soup": {"ingredients": 2, "min_ingredients": 2}}


def run(spec_dict, tmp_path, executor=None):
    spec = parse_spec(spec_dict)
    rec = LocalRecorder(progress=False)
    result = Pipeline(spec, executor or SequentialExecutor(), rec, ArtifactStore(str(tmp_path))).run()
    return spec, rec, result


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return run(SMALL, tmp_path_factory.mktemp("run"))


def test_accuracy_well_above_chance_before_and_after_pruning(small_run):
    spec, rec, result = small_run
    dense, *phases = result.phases
    assert dense.metrics["soup_accuracy"] > 0.8
    for p in phases:
        assert p.metrics["soup_accuracy"] > 5 * CHANCE
        assert all(a > 5 * CHANCE for a in p.metrics["ingredient_accuracies"])
    assert [p.phase for p in result.phases] == [0, 1, 2]


def test_sparsity_per_phase_and_final_target(small_run):
    spec, rec, result = small_run
    rate = per_phase_rate(0.8, 2)
    by_id = {m["id"]: m for m in rec.models}
    for p in result.phases[1:]:
        assert p.target_sparsity == pytest.approx(sparsity_after(rate, p.phase))
        assert p.sparsity == pytest.approx(p.target_sparsity, abs=1e-3)
    final = by_id[result.final_model_id]
    assert final["kind"] == "soup" and final["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_lineage_and_checkpoints(small_run, tmp_path):
    spec, rec, result = small_run
    models = {m["id"]: m for m in rec.models}
    kinds = [m["kind"] for m in rec.models]
    assert kinds == ["dense"] + ["pruned", "ingredient", "ingredient", "soup"] * 2
    for m in rec.models:
        edge_kinds = {k for _, k in m["parents"]}
        parent_kinds = [models[p]["kind"] for p, _ in m["parents"]]
        if m["kind"] == "pruned":
            assert edge_kinds == {"pruned_from"} and parent_kinds[0] in ("dense", "soup")
        elif m["kind"] == "ingredient":
            assert edge_kinds == {"retrained_from"} and parent_kinds == ["pruned"]
        elif m["kind"] == "soup":
            assert edge_kinds == {"averaged_from"} and parent_kinds == ["ingredient", "ingredient"]
    # the final soup's checkpoint carries exactly the mask its zeros show, and rebuilds
    final = models[result.final_model_id]
    ckpt = load(final["uri"])
    assert ckpt.meta["arch"] == "mlp" and ckpt.meta["kind"] == "soup"
    for name, mask in ckpt.masks.items():
        assert ((ckpt.state[name] != 0) == mask).all()
    # every ingredient epoch was reported
    ingredient_runs = [r for r in rec.runs.values() if r["kind"] == "ingredient"]
    assert len(ingredient_runs) == 4 and all(len(r["history"]) == 2 for r in ingredient_runs)


class FailingExecutor(SequentialExecutor):
    """Runs the real tasks, except that the named ingredients raise."""

    def __init__(self, fail: set[str]):
        self.fail = fail

    def run(self, tasks, on_epoch, on_result=None):
        out = super().run([t for t in tasks if t.name not in self.fail], on_epoch, on_result)
        for t in tasks:
            if t.name in self.fail and on_result is not None:
                on_result(t, RuntimeError(f"{t.name} died"))
        it = iter(out)
        return [RuntimeError(f"{t.name} died") if t.name in self.fail else next(it) for t in tasks]


def test_soup_from_survivors_above_min_ingredients(tmp_path):
    spec = dict(SMALL, prune={"target_sparsity": 0.5, "phases": 1}, soup={"ingredients": 3, "min_ingredients": 2})
    _, rec, result = run(spec, tmp_path, FailingExecutor({"phase1/ingredient1"}))
    assert result.phases[1].soup_ingredients == [0, 2]
    assert result.phases[1].metrics["ingredient_accuracies"][1] is None
    assert any("surviving ingredients [0, 2]" in e["message"] for e in rec.events)


def test_too_few_ingredients_fail_the_phase(tmp_path):
    spec = dict(SMALL, prune={"target_sparsity": 0.5, "phases": 1}, soup={"ingredients": 2, "min_ingredients": 2})
    with pytest.raises(PhaseFailed, match="only 1 of 2 ingredients"):
        run(spec, tmp_path, FailingExecutor({"phase1/ingredient0"}))


def test_greedy_soup_not_below_best_ingredient_on_validation(tmp_path):
    spec = dict(SMALL, prune={"target_sparsity": 0.7, "phases": 1},
                soup={"ingredients": 3, "method": "greedy", "min_ingredients": 1})
    _, rec, result = run(spec, tmp_path)
    val_of = {m["name"]: m["metrics"]["val_accuracy"] for m in rec.models}
    best = max(v for k, v in val_of.items() if "ingredient" in k)
    assert result.phases[1].metrics["soup_val_accuracy"] >= best


@pytest.mark.parametrize("vary,key", [("seed", "seed"), ("weight_decay", "weight_decay"),
                                      ("retrain_epochs", "epochs"), ("lr", "lr")])
def test_ingredients_differ_only_in_the_varied_hyperparameter(vary, key):
    spec = parse_spec({"soup": {"ingredients": 4, "vary": vary}})
    rows = ingredient_settings(spec, phase=1, eta_max=0.1)
    assert len({getattr(r, key) for r in rows}) == 4
    for other in {"seed", "weight_decay", "epochs", "lr"} - {key}:
        assert len({getattr(r, other) for r in rows}) == 1, other


def test_start_from_a_given_checkpoint(small_run, tmp_path):
    _, rec, result = small_run
    dense_uri = next(m["uri"] for m in rec.models if m["kind"] == "dense")
    spec = dict(SMALL, model={"arch": "mlp", "checkpoint": dense_uri}, prune={"target_sparsity": 0.5, "phases": 1})
    _, rec2, result2 = run(spec, tmp_path)
    assert not [r for r in rec2.runs.values() if r["kind"] == "dense"]
    assert result2.phases[0].metrics["soup_accuracy"] == pytest.approx(result.phases[0].metrics["soup_accuracy"])


class DiesAfterTheSearch(SequentialExecutor):
    """A driver that dies once the search is done, before any ingredient trains."""

    def run(self, tasks, on_epoch, on_result=None):
        if any("ingredient" in t.name for t in tasks):
            raise RuntimeError("driver died")
        return super().run(tasks, on_epoch, on_result)


class MustNotSearch(SequentialExecutor):
    def search(self, *args, **kwargs):
        raise AssertionError("the finished search ran again")


def test_a_resumed_phase_reuses_its_finished_search(store, tmp_path):
    from service.driver import resume_point
    spec = parse_spec(dict(SMALL, prune={"target_sparsity": 0.5, "phases": 1},
                           search={"space": {"lr": {"choice": [0.002, 0.05]}}, "trials": 3}))
    job = store.create_job(spec)
    artifacts = ArtifactStore(str(tmp_path))
    with pytest.raises(RuntimeError, match="driver died"):
        Pipeline(spec, DiesAfterTheSearch(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}").run()
    [chosen] = [r for r in store.runs(job.id, kind="search_trial") if r.metrics["chosen"]]
    resume = resume_point(store, job.id)
    assert resume.searched == chosen.config.config
    Pipeline(spec, MustNotSearch(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}", resume=resume).run()
    assert {r.config.lr for r in store.runs(job.id, kind="ingredient")} == {chosen.config.config["lr"]}
    assert len(store.runs(job.id, kind="search_trial")) == 3


# a BatchNorm model (ResNet-20 at a quarter width): recalibration changes its scores
BN = dict(SMALL, model={"arch": "resnet20", "kwargs": {"width": 0.25}}, dense={"epochs": 2, "lr": 0.1},
          prune={"target_sparsity": 0.5, "phases": 1}, retrain={"epochs": 1}, soup={"ingredients": 3})


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    return run(BN, tmp_path_factory.mktemp("bn"))


def _model(rec_model, spec):
    from workers.models import build_model
    ckpt = load(rec_model["uri"])
    m = build_model(spec.model.arch, num_classes=ckpt.meta["num_classes"], in_shape=tuple(ckpt.meta["in_shape"]),
                    **spec.model.kwargs)
    m.load_state_dict(ckpt.state)
    return m


def test_gains_use_ingredient_scores_after_the_same_bn_recalibration_as_the_soup(bn_run):
    spec, rec, result = bn_run
    phase = result.phases[1]
    ingredients = [m for m in rec.models if m["kind"] == "ingredient"]
    raw = [m["metrics"]["test_accuracy_raw"] for m in ingredients]
    recal = [m["metrics"]["test_accuracy"] for m in ingredients]
    assert raw != recal                                   # recalibration matters for this model
    assert phase.metrics["ingredient_accuracies"] == recal
    assert phase.metrics["gain_over_best"] == pytest.approx(phase.metrics["soup_accuracy"] - max(recal))
    assert phase.metrics["gain_over_mean"] == pytest.approx(phase.metrics["soup_accuracy"] - sum(recal) / len(recal))
    # the saved ingredient is the recalibrated one: loading it gives the recorded score
    from workers.data import load_splits, make_loader
    from workers.evaluate import evaluate
    test = make_loader(load_splits(spec.data.config(), spec.seed).test, 64, shuffle=False)
    assert evaluate(_model(ingredients[0], spec), test)["accuracy"] == pytest.approx(recal[0])


def test_ensemble_accuracy_is_the_mean_softmax_of_the_saved_ingredients(bn_run):
    import torch

    from workers.data import load_splits, make_loader
    from workers.evaluate import evaluate
    spec, rec, result = bn_run
    splits = load_splits(spec.data.config(), spec.seed)
    probs = [evaluate(_model(m, spec), make_loader(splits.test, 64, shuffle=False), probs=True)["probs"]
             for m in rec.models if m["kind"] == "ingredient"]
    expected = float((torch.stack(probs).mean(0).argmax(1) == splits.test.y).float().mean())
    assert result.phases[1].metrics["ensemble_accuracy"] == pytest.approx(expected)
    assert any("prediction ensemble of 3" in e["message"] for e in rec.events)


def test_compute_adds_up_from_runs_to_phases_to_the_job(store, tmp_path):
    spec = parse_spec(SMALL)
    job = store.create_job(spec)
    Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), ArtifactStore(str(tmp_path)),
             prefix=f"jobs/{job.id}").run()
    phases, runs, row = store.phases(job.id), store.runs(job.id), store.get_job(job.id)
    for p in phases:
        mine = [r for r in runs if r.phase == p.index]
        assert all(r.metrics["cpu_seconds"] > 0 and r.metrics["gpu_seconds"] == 0 for r in mine)
        assert p.metrics["cpu_seconds"] >= sum(r.metrics["cpu_seconds"] for r in mine) > 0
        assert p.metrics["epochs_trained"] == sum(r.metrics["epochs_trained"] for r in mine)
    assert phases[0].metrics["epochs_trained"] == spec.dense.epochs
    assert phases[1].metrics["epochs_trained"] == spec.soup.ingredients * spec.retrain.epochs
    assert row.cpu_seconds == pytest.approx(sum(p.metrics["cpu_seconds"] for p in phases))
    assert row.epochs_trained == sum(p.metrics["epochs_trained"] for p in phases)
    assert row.gpu_seconds == 0


def test_the_checkpoints_dense_lr_history_drives_the_retraining_schedule(tmp_path):
    from workers.checkpoint import Checkpoint, save
    from workers.data import load_splits, make_loader
    from workers.schedules import dense_schedule, retrain_schedule
    first = dict(SMALL, dense={"epochs": 3, "lr": 0.05, "schedule": "cosine"}, prune={"target_sparsity": 0.3,
                                                                                       "phases": 1})
    spec, rec, _ = run(first, tmp_path / "a")
    dense = next(m for m in rec.models if m["kind"] == "dense")
    # the spec's own dense section says something else: the checkpoint's history must win
    second = dict(SMALL, model={"arch": "mlp", "checkpoint": dense["uri"]},
                  dense={"epochs": 6, "lr": 0.3, "schedule": "linear"}, prune={"target_sparsity": 0.5, "phases": 1},
                  retrain={"epochs": 1, "schedule": "lrw"}, soup={"ingredients": 1, "min_ingredients": 1})
    _, rec2, _ = run(second, tmp_path / "b")
    spe = len(make_loader(load_splits(spec.data.config(), 0).train, 64, shuffle=True))
    replay = retrain_schedule("lrw", spe, dense_schedule("cosine", 0.05, 3 * spe, warmup=0.05))
    run2 = rec2.runs["phase1/ingredient0"]
    assert run2["config"]["peak_lr"] == pytest.approx(max(replay))
    assert run2["config"]["lr"] == pytest.approx(0.05)            # eta_max: the checkpoint's peak, not 0.3
    assert run2["history"][-1]["lr"] == pytest.approx(replay[-1])
    assert any("dense LR history stored in model.checkpoint" in e["message"] for e in rec2.events)
    # a checkpoint without the history: the spec's dense section, and the events say so
    bare = load(dense["uri"])
    save(tmp_path / "bare.safetensors", Checkpoint(state=bare.state, masks=bare.masks, meta={"arch": "mlp"}))
    _, rec3, _ = run(dict(second, model={"arch": "mlp", "checkpoint": str(tmp_path / "bare.safetensors")}),
                     tmp_path / "c")
    assert rec3.runs["phase1/ingredient0"]["config"]["lr"] == pytest.approx(0.3)
    assert any("no dense LR history; the retraining schedules use the spec's dense section" in e["message"]
               for e in rec3.events)
    # a checkpoint's metadata is its author's to write: a history of 10^15 steps, or an optimizer that is no
    # object, is refused before anything is built, with an event, and the spec's own section serves
    save(tmp_path / "hostile.safetensors", Checkpoint(state=bare.state, masks=bare.masks, meta={
        "arch": "mlp", "dense_optimizer": "sfw",
        "dense_schedule": {"kind": "cosine", "lr": 0.05, "epochs": 1000, "steps_per_epoch": 10**12}}))
    _, rec4, _ = run(dict(second, model={"arch": "mlp", "checkpoint": str(tmp_path / "hostile.safetensors")}),
                     tmp_path / "d")
    assert rec4.runs["phase1/ingredient0"]["config"]["lr"] == pytest.approx(0.3)
    assert any("dense LR history is unreadable" in e["message"] and "steps_per_epoch" in e["message"]
               and "dense_optimizer is unreadable" in e["message"] for e in rec4.events)


def test_a_diverging_dense_run_fails_the_job_naming_the_lr(tmp_path):
    spec = dict(SMALL, dense={"epochs": 2, "lr": 10.0})
    # at lr 10 the MLP's ReLUs die (chance level) or its loss overflows (NaN): either way a clear failure
    with pytest.raises(RuntimeError, match=r"dense training failed: (the training loss became|training ended at "
                                           r"chance level).*dense\.lr is 10; mlp trains well at 0\.1"):
        run(spec, tmp_path)


@pytest.mark.slow
def test_a_one_epoch_cnn_job_on_fashion_mnist_is_well_above_chance(tmp_path):
    """Fashion-MNIST from Debian's package (make test installs it): LeNet-5, 1 dense epoch, one phase of two
    1-epoch ingredients; everything well above chance (10%)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as an ingredient with cpus_per_ingredient=1 (and faster on 2 busy cores)
    try:
        spec = {"model": {"arch": "lenet5"}, "data": {"name": "fashion_mnist", "batch_size": 128},
                "dense": {"epochs": 1, "lr": 0.05}, "prune": {"target_sparsity": 0.5, "phases": 1},
                "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}
        _, rec, result = run(spec, tmp_path)
    finally:
        torch.set_num_threads(threads)
    dense, phase = result.phases
    assert dense.metrics["soup_accuracy"] > 0.75 and phase.metrics["soup_accuracy"] > 0.75
    assert all(a > 0.75 for a in phase.metrics["ingredient_accuracies"]) and phase.metrics["ensemble_accuracy"] > 0.75
    assert {m["metrics"]["parameters"] for m in rec.models} == {61706}    # LeNet-5 on 1x28x28, 10 classes


def test_an_sms_job_starts_from_an_sfw_trained_dense_model(tmp_path):
    """dense.optimizer sfw: phase 0 trains with Stochastic Frank-Wolfe inside k-support norm balls (tight
    ones here, radius 2 x the init norm, which an SGD-trained or freshly initialised MLP lies outside), the
    checkpoint records it, and the phases prune and retrain with SGD at the arch's SGD LR as usual."""
    import torch

    from service.plan import dense_optimizer
    from workers.sfw import SFWConfig, make_constraints
    assert dense_optimizer(parse_spec({}))["name"] == "sgd"
    sfw = {"constraint": "k_support", "k": 0.05, "radius_factor": 2.0}
    spec_dict = dict(SMALL, dense={"epochs": 4, "lr": 0.2, "optimizer": "sfw", "sfw": sfw},
                     prune={"target_sparsity": 0.5, "phases": 1}, retrain={"epochs": 1, "schedule": "llr"})
    spec, rec, result = run(spec_dict, tmp_path)
    dense_rec = next(m for m in rec.models if m["kind"] == "dense")
    assert result.phases[0].model_id == dense_rec["id"]
    assert result.phases[0].metrics["soup_accuracy"] > 0.7 and result.phases[1].metrics["soup_accuracy"] > 0.7
    ckpt = load(dense_rec["uri"])
    assert ckpt.meta["dense_optimizer"] == {"name": "sfw", "constraint": "k_support", "k": 0.05, "radius_factor": 2.0,
                                            "momentum": 0.9, "rescale": "gradient"}
    assert rec.runs["dense"]["config"]["optimizer"]["name"] == "sfw"
    assert [p["sparsity"] for p in dense_rec["metrics"]["robustness"]] == spec.prune.robustness   # its curve is kept
    # phase 0's weights are the SFW ones: inside their k-support balls (5 % slack for the radius's estimate
    # of the expected init norm), where a freshly initialised model is not
    from service.plan import make_task
    model = make_task(spec, torch.device("cpu")).build(ckpt.state)
    cons = make_constraints(model, SFWConfig(**sfw))
    for name, p in model.named_parameters():
        assert cons[name].norm(p.detach()) <= 1.05 * cons[name].radius, name
    fresh = make_task(spec, torch.device("cpu")).build()
    assert any(cons[n].norm(p.detach()) > 1.05 * cons[n].radius for n, p in fresh.named_parameters())
    # retraining is SGD at the mlp's SGD LR (0.1), not SFW's step size, and says so
    ingredient = rec.runs["phase1/ingredient0"]["config"]
    assert ingredient["lr"] == pytest.approx(0.1)
    assert any("trained with SFW" in e["message"] for e in rec.events)
    assert load(next(m for m in rec.models if m["kind"] == "soup")["uri"]).meta["dense_optimizer"]["name"] == "sfw"


def test_nm_sms_job_keeps_the_pattern_through_retraining_and_the_soup(tmp_path):
    """A 2:4 SMS job on digits with LeNet-5 (convolutions and linear layers): the pruned model, every
    ingredient and the soup have at most 2 nonzeros in every group of 4 input channels, all with the
    pruned model's mask exactly; the reported sparsity is the masks' own (the first conv, 1 input
    channel, stays dense, and an event says so)."""
    import torch

    from workers.pruning import is_nm, sparsity
    spec = {"name": "nm", "model": {"arch": "lenet5"}, "data": {"batch_size": 64}, "dense": {"epochs": 8, "lr": 0.05},
            "prune": {"pattern": "2:4"}, "retrain": {"epochs": 2}, "soup": {"ingredients": 2, "min_ingredients": 2}}
    parsed, rec, result = run(spec, tmp_path)
    assert parsed.prune.target_sparsity == 0.5 and parsed.prune.phases == 1
    phase = result.phases[1]
    models = [m for m in rec.models if m["phase"] == 1]
    assert [m["kind"] for m in models] == ["pruned", "ingredient", "ingredient", "soup"]
    pruned_masks = load(models[0]["uri"]).masks
    for m in models:
        ckpt = load(m["uri"])
        for name, mask in ckpt.masks.items():
            assert torch.equal(mask, pruned_masks[name]), (m["name"], name)
            assert torch.equal(ckpt.state[name] != 0, mask), (m["name"], name)
            assert is_nm(ckpt.state[name], 2, 4), (m["name"], name)
        assert m["sparsity"] == pytest.approx(sparsity(ckpt.masks)[0])
        assert m["metrics"]["layer_sparsity"]["0.weight"] == 0.0          # 1 input channel: dense
    assert 0.45 < phase.sparsity < 0.5
    assert phase.metrics["soup_accuracy"] > 5 * CHANCE
    assert any("0.weight (1 input channels: sparsity 0.000)" in e["message"] for e in rec.events)
