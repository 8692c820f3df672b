"""The store on SQLite and on PostgreSQL: jobs, lineage, resume without duplicates, transactions."""

import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.orm import Base, Event, Metric, Model, ModelEdge, Phase, Run
from service.pipeline import ModelRecord, PhaseSummary, RunRecord
from service.spec import parse_spec
from service.store import JobNotFound, StateError

SPEC = parse_spec({"name": "t", "prune": {"phases": 2}, "soup": {"ingredients": 2}})


def test_migration_matches_the_orm(store):
    with store.engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []


def test_sqlite_pragmas(tmp_path):
    from service.store import Store
    s = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with s.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_jobs_list_filter_paginate(store):
    ids = [store.create_job(SPEC).id for _ in range(7)]
    store.set_status(ids[0], "running")
    rows, count = store.list_jobs(limit=3)
    assert count == 7 and len(rows) == 3
    rows2, _ = store.list_jobs(limit=3, offset=3)
    assert not {r.id for r in rows} & {r.id for r in rows2}
    running, n = store.list_jobs(status="running")
    assert n == 1 and running[0].id == ids[0]
    assert store.list_jobs(status="queued")[1] == 6


def test_idempotency_key_gives_one_job(store):
    a = store.create_job(SPEC, idempotency_key="abc")
    b = store.create_job(SPEC, idempotency_key="abc")
    c = store.create_job(SPEC, idempotency_key="abc", owner="bob")     # keys are per owner
    assert a.id == b.id != c.id
    assert store.list_jobs()[1] == 2


def test_status_transitions_and_terminal_states(store):
    job = store.create_job(SPEC)
    claimed = store.claim_queued(5)
    assert [j.id for j in claimed] == [job.id] and claimed[0].status == "running"
    assert store.claim_queued(5) == []
    store.set_status(job.id, "cancelled")
    with pytest.raises(StateError, match="is cancelled; it cannot become running"):
        store.set_status(job.id, "running")
    assert store.job_failed(job.id, "late failure") is None            # a cancelled job stays cancelled
    assert store.get_job(job.id).status == "cancelled"
    with pytest.raises(JobNotFound):
        store.set_status("nope", "running")


def model(kind, phase, name, parents=()):
    return ModelRecord(id=uuid.uuid4().hex, kind=kind, phase=phase, name=name, uri=f"mem://{name}", size_bytes=10,
                       sha256="0" * 64, sparsity=0.5 * phase, nonzeros=100, metrics={"test_accuracy": 0.9},
                       parents=list(parents))


def feed_job(store, job_id, phases=2, ingredients=2):
    """The calls the pipeline makes for a job (no training needed for the store)."""
    rec = store.recorder(job_id)
    rec.job_started(SPEC, total_epochs=2 + phases * ingredients * 2)
    rec.phase_started(0, 0.0)
    rec.run_started(RunRecord("dense", "dense", 0, {"epochs": 2}))
    for e in (1, 2):
        rec.metric("dense", {"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "val_accuracy": 0.5 + e / 10})
    parent = model("dense", 0, "phase0/dense")
    rec.model_saved(parent)
    rec.run_finished("dense", "succeeded", model_id=parent.id)
    rec.phase_finished(PhaseSummary(phase=0, target_sparsity=0.0, sparsity=0.0, model_id=parent.id))
    all_models = [parent]
    for t in range(1, phases + 1):
        rec.phase_started(t, 0.5 * t)
        pruned = model("pruned", t, f"phase{t}/pruned", [(parent.id, "pruned_from")])
        rec.model_saved(pruned)
        ings = []
        for i in range(ingredients):
            name = f"phase{t}/ingredient{i}"
            rec.run_started(RunRecord(name, "ingredient", t, {"seed": i}))
            for e in (1, 2):
                rec.metric(name, {"epoch": e, "step": 5 * e, "train_loss": 0.5, "lr": 0.1})
            ing = model("ingredient", t, name, [(pruned.id, "retrained_from")])
            rec.model_saved(ing)
            rec.run_finished(name, "succeeded", model_id=ing.id, metrics={"test_accuracy": 0.9})
            ings.append(ing)
        soup = model("soup", t, f"phase{t}/soup", [(i.id, "averaged_from") for i in ings])
        rec.model_saved(soup)
        rec.phase_finished(PhaseSummary(phase=t, target_sparsity=0.5 * t, sparsity=0.5 * t, soup_accuracy=0.9,
                                        ingredient_accuracies=[0.9] * ingredients, model_id=soup.id))
        all_models += [pruned, *ings, soup]
        parent = soup
    return all_models


def test_lineage_dag_through_phases(store):
    job = store.create_job(SPEC)
    models = feed_job(store, job.id)
    final = models[-1]
    lin = store.lineage(final.id)
    assert {n.id for n in lin["nodes"]} == {m.id for m in models}          # 1 + 2 * (1 + 2 + 1)
    assert len(lin["nodes"]) == 9
    kinds = {(e["parent"], e["child"]): e["kind"] for e in lin["edges"]}
    by_name = {m.name: m.id for m in models}
    assert kinds[(by_name["phase0/dense"], by_name["phase1/pruned"])] == "pruned_from"
    assert kinds[(by_name["phase1/pruned"], by_name["phase1/ingredient1"])] == "retrained_from"
    assert kinds[(by_name["phase1/ingredient0"], by_name["phase1/soup"])] == "averaged_from"
    assert kinds[(by_name["phase1/soup"], by_name["phase2/pruned"])] == "pruned_from"
    assert len(lin["edges"]) == 2 * (1 + 2 + 2)
    down = store.descendants(by_name["phase0/dense"])
    assert {n.id for n in down["nodes"]} == {m.id for m in models}
    mid = store.lineage(by_name["phase1/ingredient0"])
    assert {n.name for n in mid["nodes"]} == {"phase0/dense", "phase1/pruned", "phase1/ingredient0"}


def test_metrics_progress_and_reads(store):
    job = store.create_job(SPEC)
    feed_job(store, job.id)
    rows = store.metrics(job.id, run_name="phase1/ingredient0", name="train_loss")
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 5), (2, 10)]
    j = store.get_job(job.id)
    assert j.done_epochs == 10 and j.progress == pytest.approx(0.99)   # capped until it succeeds
    store.job_succeeded(job.id, "m")
    assert store.get_job(job.id).progress == 1.0
    assert [p.index for p in store.completed_phases(job.id)] == [0, 1, 2]
    assert len(store.finished_ingredients(job.id, 1)) == 2


def count(store, table):
    with store.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(table)).scalar()


def test_resumed_calls_create_no_duplicate_rows(store):
    job = store.create_job(SPEC)
    feed_job(store, job.id, phases=1)
    before = {t.__tablename__: count(store, t) for t in (Phase, Run, Model, ModelEdge)}
    rec = store.recorder(job.id)
    rec.job_started(SPEC, 10)
    rec.phase_started(1, 0.5)                      # the same phase again
    rec.run_started(RunRecord("phase1/ingredient0", "ingredient", 1, {"seed": 0}))
    rec.metric("phase1/ingredient0", {"epoch": 1, "step": 5, "train_loss": 0.4})
    after = {t.__tablename__: count(store, t) for t in (Phase, Run, Model, ModelEdge)}
    assert after == before
    run = next(r for r in store.runs(job.id) if r.name == "phase1/ingredient0")
    assert run.attempts == 2 and run.status == "running"
    assert len(store.metrics(job.id, run_name="phase1/ingredient0")) == 1   # the old curve went


def test_a_failed_write_leaves_nothing_half_written(store):
    job = store.create_job(SPEC)
    rec = store.recorder(job.id)
    rec.job_started(SPEC, 1)
    orphan = model("pruned", 1, "phase1/pruned", [("no-such-parent", "pruned_from")])
    with pytest.raises(sa.exc.IntegrityError):
        rec.model_saved(orphan)                   # the edge's parent does not exist
    assert store.get_model(orphan.id) is None     # the model row was rolled back with its edge
    assert count(store, ModelEdge) == 0


def test_events_in_order_with_cursor(store):
    job = store.create_job(SPEC)
    rec = store.recorder(job.id)
    for i in range(5):
        rec.event(f"e{i}", phase=i)
    first = store.events(job.id, limit=2)
    rest = store.events(job.id, after_id=first[-1].id)
    assert [e.message for e in first + rest] == [f"e{i}" for i in range(5)]


def test_nan_metrics_are_stored_as_null(store):
    job = store.create_job(SPEC)
    rec = store.recorder(job.id)
    rec.job_started(SPEC, 1)
    m = model("dense", 0, "phase0/dense")
    m.metrics = {"val_accuracy": float("nan"), "test_accuracy": 0.5}
    rec.model_saved(m)
    assert store.get_model(m.id).metrics == {"val_accuracy": None, "test_accuracy": 0.5}
