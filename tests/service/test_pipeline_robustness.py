"""The dense model's one-shot robustness curve in a local pipeline run on real data (digits), into the
store: measured once in phase 0, kept in the dense model's metrics, said by an event, not measured
again by a resumed job, and not at all when the spec turns it off."""

import pytest

from service.artifacts import ArtifactStore
from service.executors import SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import DBRecorder, LocalRecorder
from service.spec import SpecError, parse_spec
from workers.robustness import SPARSITIES

SMALL = {"name": "robust", "data": {"batch_size": 64}, "dense": {"epochs": 4, "lr": 0.1},
         "prune": {"target_sparsity": 0.5, "phases": 1}, "retrain": {"epochs": 1},
         "soup": {"ingredients": 2, "min_ingredients": 2}}


def _robustness_events(events):
    return [e for e in events if "one-shot robustness" in e.message]


class DiesAtTheIngredients(SequentialExecutor):
    """A driver that dies once phase 0 is done, before any ingredient of phase 1 trains."""

    def run(self, tasks, on_epoch, on_result=None):
        if any("ingredient" in t.name for t in tasks):
            raise RuntimeError("driver died")
        return super().run(tasks, on_epoch, on_result)


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_job_stores_the_curve_on_its_dense_model_once_across_a_resume(store, tmp_path):
    from service.driver import resume_point
    spec = parse_spec(SMALL)
    assert spec.prune.robustness == list(SPARSITIES)                     # on by default
    job = store.create_job(spec)
    artifacts = ArtifactStore(str(tmp_path))
    with pytest.raises(RuntimeError, match="driver died"):
        Pipeline(spec, DiesAtTheIngredients(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}").run()

    [phase0] = store.completed_phases(job.id)
    dense = store.get_model(phase0.model_id)
    assert dense.kind == "dense"
    points = dense.metrics["robustness"]
    assert dense.metrics["robustness_split"] == "test"
    assert [p["sparsity"] for p in points] == list(SPARSITIES)
    acc = [p["accuracy"] for p in points]
    assert acc[0] > 0.5 and acc[-1] < acc[0]                               # digits: 10 classes
    assert all("accuracy_raw" not in p for p in points)                   # the mlp has no BatchNorm
    assert phase0.seconds["robustness"] > 0
    [event] = _robustness_events(store.events(job.id))
    assert event.phase == 0 and "8 sparsities" in event.message and "test accuracy" in event.message

    # the resumed driver starts after phase 0: the curve is kept as it was, not measured again
    Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}",
             resume=resume_point(store, job.id)).run()
    assert store.get_job(job.id).status != "failed"
    assert store.get_model(dense.id).metrics["robustness"] == points
    assert len(_robustness_events(store.events(job.id))) == 1
    assert [p.index for p in store.completed_phases(job.id)] == [0, 1]


def test_the_grid_is_the_specs_and_null_turns_it_off(tmp_path):
    def dense_metrics(robustness):
        spec = parse_spec(dict(SMALL, dense={"epochs": 2, "lr": 0.1},
                               prune={"target_sparsity": 0.5, "phases": 1, "robustness": robustness}))
        rec = LocalRecorder(progress=False)
        Pipeline(spec, SequentialExecutor(), rec, ArtifactStore(str(tmp_path / str(robustness)))).run()
        [dense] = [m for m in rec.models if m["kind"] == "dense"]
        return dense["metrics"], [e for e in rec.events if "robustness" in e["message"]]

    metrics, events = dense_metrics([0.9, 0.3])
    assert [p["sparsity"] for p in metrics["robustness"]] == [0.3, 0.9]
    assert len(events) == 1 and "2 sparsities" in events[0]["message"]
    metrics, events = dense_metrics(None)
    assert "robustness" not in metrics and not events


def test_bad_grids_are_refused_naming_the_field():
    for bad in ([1.0], [0.5, -0.2], [i / 100 for i in range(40)]):
        with pytest.raises(SpecError, match="prune.robustness"):
            parse_spec(dict(SMALL, prune={"robustness": bad}))


@pytest.mark.slow
def test_a_language_model_job_says_it_has_no_curve(tiny_lm, tmp_path):
    from tests.service.test_lm_pipeline import lm_spec
    arch, text = tiny_lm
    spec = lm_spec(arch, text, retrain={"epochs": 1, "params": "bias_norm", "lr": 3e-3})
    assert spec.prune.robustness                                     # the default grid, on
    rec = LocalRecorder(progress=False)
    Pipeline(spec, SequentialExecutor(), rec, ArtifactStore(str(tmp_path))).run()
    [dense] = [m for m in rec.models if m["kind"] == "dense"]
    assert "robustness" not in dense["metrics"]
    [event] = [e for e in rec.events if "robustness" in e["message"]]
    assert event["phase"] == 0 and "does not measure it" in event["message"]
