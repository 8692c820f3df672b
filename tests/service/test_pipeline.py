"""The local pipeline end to end on real data (scikit-learn's digits)."""

import pytest

from service.artifacts import ArtifactStore
from service.pipeline import Pipeline, PhaseFailed, SequentialExecutor, ingredient_settings
from service.recorder import LocalRecorder
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
    assert dense.soup_accuracy > 0.8
    for p in phases:
        assert p.soup_accuracy > 5 * CHANCE
        assert all(a > 5 * CHANCE for a in p.ingredient_accuracies)
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
    assert result.phases[1].ingredient_accuracies[1] is None
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
    assert result.phases[1].soup_val_accuracy >= best


@pytest.mark.parametrize("vary,key", [("seed", "seed"), ("weight_decay", "weight_decay"),
                                      ("retrain_epochs", "epochs"), ("lr", "lr")])
def test_ingredients_differ_only_in_the_varied_hyperparameter(vary, key):
    spec = parse_spec({"soup": {"ingredients": 4, "vary": vary}})
    rows = ingredient_settings(spec, phase=1, eta_max=0.1)
    assert len({r[key] for r in rows}) == 4
    for other in {"seed", "weight_decay", "epochs", "lr"} - {key}:
        assert len({r[other] for r in rows}) == 1, other


def test_start_from_a_given_checkpoint(small_run, tmp_path):
    _, rec, result = small_run
    dense_uri = next(m["uri"] for m in rec.models if m["kind"] == "dense")
    spec = dict(SMALL, model={"arch": "mlp", "checkpoint": dense_uri}, prune={"target_sparsity": 0.5, "phases": 1})
    _, rec2, result2 = run(spec, tmp_path)
    assert not [r for r in rec2.runs.values() if r["kind"] == "dense"]
    assert result2.phases[0].soup_accuracy == pytest.approx(result.phases[0].soup_accuracy)


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
        Pipeline(spec, DiesAfterTheSearch(), store.recorder(job.id), artifacts, prefix=f"jobs/{job.id}").run()
    [chosen] = [r for r in store.runs(job.id, kind="search_trial") if r.metrics["chosen"]]
    resume = resume_point(store, job.id)
    assert resume.searched == chosen.config["config"]
    Pipeline(spec, MustNotSearch(), store.recorder(job.id), artifacts, prefix=f"jobs/{job.id}", resume=resume).run()
    assert {r.config["lr"] for r in store.runs(job.id, kind="ingredient")} == {chosen.config["config"]["lr"]}
    assert len(store.runs(job.id, kind="search_trial")) == 3
