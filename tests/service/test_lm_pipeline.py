"""Language-model jobs through the pipeline (sequential executor, SQLite store) on a tiny LLaMA trained
here: phase 0 scores the pretrained model, pruning is calibrated, PERP retraining keeps the mask, the
soup is scored by perplexity, and the store keeps it all under perplexity's names."""

import math

import pytest

from service.artifacts import ArtifactStore
from service.executors import SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import DBRecorder
from service.spec import SpecError, parse_spec
from workers.checkpoint import load
from workers.lm.prune import prunable_lm_names

pytestmark = pytest.mark.slow


def lm_spec(arch, text, **over):
    spec = {"name": "lm", "model": {"arch": arch}, "data": {"name": "text", "path": text, "seq_len": 16,
                                                             "calibration_samples": 8, "batch_size": 8},
            "prune": {"target_sparsity": 0.5, "phases": 1, "criterion": "wanda"},
            "retrain": {"epochs": 2, "params": "mask_lora", "lr": 3e-3}, "soup": {"ingredients": 2}}
    spec.update(over)
    return parse_spec(spec)


@pytest.mark.parametrize("params", ["mask_lora", "bias_norm"])
def test_an_lm_job_prunes_retrains_keeping_the_mask_and_reports_perplexity(tiny_lm, store, tmp_path, params):
    arch, text = tiny_lm
    spec = lm_spec(arch, text, retrain={"epochs": 2, "params": params, "lr": 3e-3})
    job = store.create_job(spec)
    result = Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), ArtifactStore(str(tmp_path)),
                      prefix=f"jobs/{job.id}").run()
    dense, phase = result.phases
    m = phase.metrics
    assert dense.metrics["soup_perplexity"] > 1 and phase.sparsity == pytest.approx(0.5, abs=0.01)
    assert m["pruned_perplexity"] > dense.metrics["soup_perplexity"]          # pruning hurts
    assert all(p < m["pruned_perplexity"] for p in m["ingredient_perplexities"])   # retraining recovers
    assert m["soup_perplexity"] < m["pruned_perplexity"]
    assert m["soup_loss"] == pytest.approx(math.log(m["soup_perplexity"]))     # perplexity = exp(loss)
    assert m["gain_over_best"] == pytest.approx(min(m["ingredient_perplexities"]) - m["soup_perplexity"])
    assert not any("accuracy" in k for k in m) and m.get("ensemble_perplexity") is None
    soup = load(store.get_model(result.final_model_id).uri)
    pruned = load(store.get_model(store.phases(job.id)[1].pruned_model_id).uri)
    assert set(soup.masks) == set(pruned.masks) and len(soup.masks) == 2 * 7
    for name, mask in pruned.masks.items():                   # the soup has the pruned model's exact mask
        assert bool((soup.masks[name] == mask).all()) and bool((soup.state[name][~mask] == 0).all())
        assert (mask.sum(dim=1) == mask.shape[1] // 2).all()  # wanda: half of every output row
    row = store.get_job(job.id)
    assert row.best_score == min(m["soup_perplexity"], *m["ingredient_perplexities"])
    runs = {r.name: r for r in store.runs(job.id, kind="ingredient")}
    share = runs["phase1/ingredient0"].metrics["trainable_share"]    # rank-8 adapters on 32-wide layers: a lot
    assert 0 < share < {"mask_lora": 0.5, "bias_norm": 0.05}[params]


def test_an_lm_job_searches_its_retraining_lr_on_validation_perplexity(tiny_lm, store, tmp_path):
    arch, text = tiny_lm
    spec = lm_spec(arch, text, search={"space": {"lr": {"loguniform": [1e-4, 1e-2]}}, "trials": 3,
                                       "metric": "val_perplexity", "scheduler": "fifo"})
    job = store.create_job(spec)
    Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), ArtifactStore(str(tmp_path)),
             prefix=f"jobs/{job.id}").run()
    from service.store.convert import search_trial
    trials = [search_trial(r) for r in store.runs(job.id, kind="search_trial")]
    assert len(trials) == 3 and all(t.val_perplexity is not None for t in trials)
    [chosen] = [t for t in trials if t.chosen]
    assert chosen.val_perplexity == min(t.val_perplexity for t in trials)
    lrs = {r.config.lr for r in store.runs(job.id, kind="ingredient")}
    assert lrs == {chosen.config["lr"]}                       # the ingredients retrain with the chosen LR


@pytest.mark.parametrize("over,field", [
    ({"prune": {"target_sparsity": 0.5, "phases": 1, "criterion": "random"}}, "criterion random"),
    ({"prune": {"target_sparsity": 0.3, "phases": 1, "pattern": "2:4"}}, "target_sparsity"),
    ({"prune": {"target_sparsity": 0.5, "phases": 2, "pattern": "2:4"}}, "phases must be 1"),
    ({"data": {"name": "digits"}}, "data.name text"),
    ({"model": {"arch": "hf:/no/such/folder"}}, "model.arch: not readable"),            # outside the data roots
    ({"search": {"space": {"lr": {"loguniform": [1e-4, 1e-2]}}}}, "val_perplexity"),
])
def test_bad_lm_specs_are_refused_naming_the_problem(tiny_lm, over, field):
    arch, text = tiny_lm
    with pytest.raises(SpecError, match=field):
        lm_spec(arch, text, **over)


def test_trust_remote_code_cannot_come_from_a_spec(tiny_lm):
    arch, text = tiny_lm
    with pytest.raises(SpecError, match="trust_remote_code"):
        lm_spec(arch, text, model={"arch": arch, "kwargs": {"trust_remote_code": True}})


def test_image_jobs_refuse_what_is_for_language_models():
    for over in ({"prune": {"criterion": "wanda"}}, {"retrain": {"params": "mask_lora"}}):
        with pytest.raises(SpecError, match="language model"):
            parse_spec(over)


def test_lm_masks_cover_the_blocks_linear_layers_only(tiny_lm):
    from workers.lm.model import load_causal_lm
    model, _ = load_causal_lm(tiny_lm[0])
    names = prunable_lm_names(model)
    assert len(names) == 2 * 7 and not any("embed" in n or "lm_head" in n for n in names)


class DiesMidPhaseTwo(SequentialExecutor):
    """A driver that dies in phase 2 after its first ingredient finished (and was recorded)."""

    def run(self, tasks, on_epoch, on_result=None):
        if tasks and tasks[0].name.startswith("phase2/ingredient"):
            super().run(tasks[:1], on_epoch, on_result)
            raise RuntimeError("driver died")
        return super().run(tasks, on_epoch, on_result)


def test_an_interrupted_lm_job_resumes_reusing_its_pruned_model_and_finished_ingredient(tiny_lm, store, tmp_path):
    from service.driver import resume_point
    arch, text = tiny_lm
    spec = lm_spec(arch, text, prune={"target_sparsity": 0.5, "phases": 2, "criterion": "sparsegpt"})
    job = store.create_job(spec)
    artifacts = ArtifactStore(str(tmp_path))
    with pytest.raises(RuntimeError, match="driver died"):
        Pipeline(spec, DiesMidPhaseTwo(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}").run()
    resume = resume_point(store, job.id)
    assert len(resume.phases) == 2 and resume.pruned is not None and list(resume.ingredients) == ["phase2/ingredient0"]
    kept = resume.ingredients["phase2/ingredient0"].id
    result = Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}",
                      resume=resume).run()
    assert [p.phase for p in result.phases] == [0, 1, 2] and result.phases[2].sparsity == pytest.approx(0.5, abs=0.01)
    ingredients = {r.name: r for r in store.runs(job.id, kind="ingredient") if r.phase == 2}
    assert ingredients["phase2/ingredient0"].model_id == kept            # reused, not retrained
    soup = load(store.get_model(result.final_model_id).uri)
    pruned = load(resume.pruned.uri)
    assert all(bool((soup.masks[n] == m).all()) for n, m in pruned.masks.items())
