"""The store on SQLite and on PostgreSQL (the `store` fixture of tests/conftest.py runs every test
on both): jobs, status rules, lineage, resume without duplicates, transactions, the migration."""

import contextlib
import threading
import time
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service import db
from service.orm import Base, Event, Metric, Model, ModelEdge, Phase, Run
from service.records import ModelRecord, PhaseSummary, RunRecord
from service.spec import parse_spec
from service.store import JobCancelled, JobNotFound, StateError, Store, TokenRefused
from service.recorders import DBRecorder
from tests.conftest import fresh_pg_database

SPEC = parse_spec({"name": "t", "prune": {"phases": 2}, "soup": {"ingredients": 2}})


def count(store, table, **where):
    with store.engine.connect() as c:
        q = sa.select(sa.func.count()).select_from(table.__table__)
        return c.execute(q.where(*[table.__table__.c[k] == v for k, v in where.items()])).scalar()


# ---------------------------------------------------------------- schema and engine

def test_migration_matches_the_orm(store):
    with store.engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []


def test_migration_has_the_orms_constraints(store):
    """What compare_metadata does not look at: CHECK constraints and ON DELETE rules."""
    insp = sa.inspect(store.engine)
    for table in Base.metadata.sorted_tables:
        checks = {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)}
        assert {c["name"] for c in insp.get_check_constraints(table.name)} == checks, table.name
        fks = {(fk.constraint.name, fk.parent.name, fk.column.table.name, fk.ondelete) for fk in table.foreign_keys}
        assert {(fk["name"], *fk["constrained_columns"], fk["referred_table"], fk["options"].get("ondelete"))
                for fk in insp.get_foreign_keys(table.name)} == fks, table.name


def test_migrate_is_idempotent_and_downgrades(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'm.db'}"        # the folder is created
    db.migrate(url)
    db.migrate(url)                                      # at head already: nothing to do
    engine = db.make_engine(url)
    assert set(Base.metadata.tables) <= set(sa.inspect(engine).get_table_names())
    with engine.begin() as conn:
        cfg = db.alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert sa.inspect(engine).get_table_names() == ["alembic_version"]
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_db(request, tmp_path):
    """An empty database on each backend: (its engine, `migrate(revision, down=False)`, which migrates it
    there through db.migrate and returns its reflected tables)."""
    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'm.db'}" if request.param == "sqlite"
               else stack.enter_context(fresh_pg_database()))
        engine = db.make_engine(url)
        stack.callback(engine.dispose)

        def migrate(to: str, down: bool = False) -> sa.MetaData:
            db.migrate(engine, to, down=down)
            meta = sa.MetaData()
            meta.reflect(engine)
            return meta

        yield engine, migrate


def test_phase_metrics_move_into_one_json_column_and_back(fresh_db):
    """Migration 0006 on a database with a finished phase: its metric columns become keys of
    phases.metrics (nulls left out), jobs.best_accuracy becomes best_score; downgrading restores both."""
    engine, migrate = fresh_db
    t = migrate("0005").tables
    now = sa.func.now()
    with engine.begin() as c:
        c.execute(t["jobs"].insert().values(id="j", name="old", status="succeeded", spec={}, progress=1.0,
                                            attempts=1, total_epochs=3, done_epochs=3, best_accuracy=0.91,
                                            created_at=now, updated_at=now))
        c.execute(t["phases"].insert().values(job_id="j", index=1, status="succeeded", target_sparsity=0.5,
                                              sparsity=0.5, soup_accuracy=0.91, pruned_accuracy=0.7,
                                              ingredient_accuracies=[0.9, None], soup_ingredients=[0, 1],
                                              seconds={"total": 2.0}, epochs_trained=4, started_at=now))
    t = migrate("head").tables
    with engine.connect() as c:
        phase = c.execute(sa.select(t["phases"])).mappings().one()
        job = c.execute(sa.select(t["jobs"])).mappings().one()
    assert phase["metrics"] == {"soup_accuracy": 0.91, "pruned_accuracy": 0.7, "ingredient_accuracies": [0.9, None],
                                "epochs_trained": 4}
    assert "soup_accuracy" not in phase and job["best_score"] == 0.91 and "best_accuracy" not in job
    t = migrate("0005", down=True).tables
    with engine.connect() as c:
        phase = c.execute(sa.select(t["phases"])).mappings().one()
        job = c.execute(sa.select(t["jobs"])).mappings().one()
    assert (phase["soup_accuracy"], phase["pruned_accuracy"], phase["ingredient_accuracies"],
            phase["epochs_trained"], phase["ensemble_accuracy"]) == (0.91, 0.7, [0.9, None], 4, None)
    assert job["best_accuracy"] == 0.91 and "metrics" not in phase


def test_sqlite_pragmas(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with s.engine.connect() as c:
        pragma = lambda name: c.exec_driver_sql(f"PRAGMA {name}").scalar()   # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1                  # on again after the migration
        assert pragma("busy_timeout") == 30000
        assert pragma("synchronous") == 1                   # NORMAL
    s.engine.dispose()


def test_timestamps_are_aware_utc(store):
    job = store.create_job(SPEC)
    row = store.get_job(job.id)
    assert row.created_at.tzinfo == timezone.utc and row.updated_at.tzinfo == timezone.utc
    store.set_status(job.id, "running")
    assert store.get_job(job.id).started_at.tzinfo == timezone.utc


# ---------------------------------------------------------------- jobs

def test_jobs_list_filter_paginate(store):
    ids = [store.create_job(SPEC, owner="ann" if i % 2 else None).id for i in range(7)]
    store.set_status(ids[0], "running")
    rows, n = store.list_jobs(limit=3)
    assert n == 7 and [r.id for r in rows] == ids[::-1][:3]              # newest first
    rows2, n2 = store.list_jobs(limit=3, offset=3)
    assert n2 == 7 and [r.id for r in rows2] == ids[::-1][3:6]
    running, n = store.list_jobs(status="running")
    assert n == 1 and running[0].id == ids[0] and running[0].spec == SPEC.model_dump(mode="json")
    assert store.list_jobs(status="queued")[1] == 6
    assert store.list_jobs(owner="ann")[1] == 3
    assert store.list_jobs(owner="ann", status="queued", limit=1)[1] == 3
    assert store.list_jobs(offset=10) == ([], 7)


def test_a_list_without_specs_reads_only_their_outline_columns(store):
    """GET /jobs without include_spec: each job's outline (task, phase count) is kept in columns of its own
    when it is stored, and the list reads those, no spec: a spec the database cannot read breaks nothing."""
    from api.schemas import JobPublic
    from service.orm import Job
    from service.records import JobOutline
    from service.store.jobs import stored_spec
    lm_spec = {**SPEC.model_dump(mode="json"), "model": {"arch": "hf:/models/tiny", "kwargs": {}},
               "data": {"name": "text", "path": "/corpus"}, "prune": {"phases": 3}}
    assert JobOutline.of(lm_spec) == JobOutline("causal_lm", 3)
    with store.tx() as s:               # a language-model job as the API stores it (its spec is not checked here)
        s.add(Job(id=uuid.uuid4().hex, name="lm", status="queued", spec=lm_spec, task="causal_lm", phases_total=3))
    image = store.create_job(SPEC)
    assert (image.task, image.phases_total) == ("classification", 2) and stored_spec(SPEC) == image.spec
    rows, n = store.list_jobs(spec=False)
    assert n == 2 and {r["name"]: r["outline"] for r in rows} == {
        "lm": JobOutline("causal_lm", 3), "t": JobOutline("classification", 2)}
    assert all("spec" not in r for r in rows)
    listed = {r["name"]: JobPublic.model_validate(JobPublic.listed(dict(r))) for r in rows}
    assert (listed["lm"].metric.name, listed["lm"].phases_total) == ("perplexity", 3)
    assert (listed["t"].metric.name, listed["t"].phases_total) == ("accuracy", 2)


def test_the_outline_migration_fills_in_existing_jobs(tmp_path):
    """Jobs stored before the outline columns (revision 0008) get them from their specs on upgrade."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    db.migrate(engine, "0008")
    now = "2026-12-01 00:00:00"
    with engine.begin() as c:
        for job_id, spec in (("a", {"model": {"arch": "hf:/m"}, "data": {"name": "text"}, "prune": {"phases": 4}}),
                             ("b", {"model": {"arch": "mlp"}, "prune": {"phases": 2}}), ("c", "not json")):
            c.execute(sa.text("INSERT INTO jobs (id, name, status, spec, progress, attempts, driver_failures, "
                              "total_epochs, done_epochs, created_at, updated_at) VALUES (:id, 'x', 'queued', :spec, "
                              "0, 0, 0, 0, 0, :now, :now)"),
                      {"id": job_id, "spec": spec if isinstance(spec, str) else json.dumps(spec), "now": now})
    db.migrate(engine, "head")
    with engine.connect() as c:
        got = {r[0]: (r[1], r[2]) for r in c.execute(sa.text("SELECT id, task, phases_total FROM jobs"))}
    engine.dispose()
    assert got == {"a": ("causal_lm", 4), "b": ("classification", 2), "c": ("classification", 1)}


def test_idempotency_key_gives_one_job(store):
    a = store.create_job(SPEC, idempotency_key="abc")
    b = store.create_job(SPEC, idempotency_key="abc")
    c = store.create_job(SPEC, idempotency_key="abc", owner="bob")     # keys are per owner
    d = store.create_job(SPEC, idempotency_key="abc", owner="bob")
    assert a.id == b.id != c.id == d.id
    assert store.list_jobs()[1] == 2


def test_idempotency_key_under_concurrent_requests(store):
    ids, errors = [], []

    def submit():
        try:
            ids.append(store.create_job(SPEC, idempotency_key="race").id)
        except Exception as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1 and store.list_jobs()[1] == 1


def test_status_transitions_and_terminal_states(store):
    job = store.create_job(SPEC)
    later = store.create_job(SPEC)
    claimed = store.claim_queued(1)                     # oldest first
    assert [j.id for j in claimed] == [job.id] and claimed[0].status == "running" and claimed[0].started_at
    assert [j.id for j in store.claim_queued(5)] == [later.id]
    assert store.claim_queued(5) == []
    store.set_status(job.id, "cancelled")
    assert store.set_status(job.id, "cancelled").status == "cancelled"   # the same again: no error
    assert [e.message for e in store.events(job.id)] == ["job cancelled; what finished is kept"]   # once
    with pytest.raises(StateError, match=f"job {job.id} is cancelled; it cannot become running") as e:
        store.set_status(job.id, "running")
    assert (e.value.current, e.value.requested) == ("cancelled", "running")
    assert store.job_failed(job.id, "late failure") is None            # a cancelled job stays cancelled
    with pytest.raises(StateError):
        store.job_succeeded(job.id, "m")
    with pytest.raises(JobCancelled):
        DBRecorder(store, job.id).job_started(SPEC, 1)
    row = store.get_job(job.id)
    assert row.status == "cancelled" and row.finished_at and row.error is None
    failed = store.job_failed(later.id, "boom")
    assert failed.status == "failed" and store.get_job(later.id).error == "boom"
    with pytest.raises(JobNotFound):
        store.set_status("nope", "running")


def test_requeue_and_the_fence_on_superseded_drivers(store):
    job = store.create_job(SPEC)
    [claimed] = store.claim_queued(1)
    store.record_submission(job.id, job.id, 1, "submitted")
    stale = DBRecorder(store, job.id, submission=job.id)
    assert store.requeue(job.id, "the service stopped").status == "queued"
    row = store.get_job(job.id)
    assert (row.status, row.ray_submission_id, row.attempts, row.driver_failures) == ("queued", None, 1, 0)
    assert "the service stopped; the job waits in the queue" in store.events(job.id)[-1].message
    assert store.requeue(job.id, "again") is None                       # only a running job goes back
    # the old driver can neither start the job again nor fail it
    with pytest.raises(StateError):
        stale.job_started(SPEC, 1)
    assert store.job_failed(job.id, "zombie", submission=job.id) is None
    store.claim_queued(1)
    store.record_submission(job.id, f"{job.id}-r2", 2, "submitted")
    with pytest.raises(StateError, match="running elsewhere"):
        stale.job_started(SPEC, 1)
    assert store.job_failed(job.id, "zombie", submission=job.id) is None
    DBRecorder(store, job.id, submission=f"{job.id}-r2").job_started(SPEC, 1)
    assert store.driver_lost(job.id).driver_failures == 1
    assert store.job_failed(job.id, "real", submission=f"{job.id}-r2").status == "failed"
    with pytest.raises(StateError, match="is failed; it cannot become queued"):
        store.set_status(job.id, "queued")


def test_per_owner_limit_of_running_jobs(store):
    ann = [store.create_job(SPEC, owner="ann") for _ in range(3)]
    bob = store.create_job(SPEC, owner="bob")
    # ann's oldest runs; her second waits for it and bob's job, submitted later, goes first
    assert [j.id for j in store.claim_queued(5, per_owner=1)] == [ann[0].id, bob.id]
    assert store.claim_queued(5, per_owner=1) == []
    store.job_failed(ann[0].id, "done")
    assert [j.id for j in store.claim_queued(5, per_owner=1)] == [ann[1].id]
    assert [j.id for j in store.claim_queued(5, per_owner=2)] == [ann[2].id]


def test_update_job(store):
    job = store.create_job(SPEC)
    store.update_job(job.id, ray_submission_id=f"{job.id}-r2", attempts=2)
    row = store.get_job(job.id)
    assert (row.ray_submission_id, row.attempts) == (f"{job.id}-r2", 2) and row.updated_at >= row.created_at
    with pytest.raises(TypeError, match="not_a_column"):
        store.update_job(job.id, not_a_column=1)


def test_tokens(store):
    assert not store.has_admin_token()
    token, secret = store.create_token("ann", admin=True)
    assert store.has_admin_token() and store.check_token(secret).id == token.id and store.check_token("x") is None
    assert token.last4 == secret[-4:] and token.expires_at is None and token.revoked_at is None
    with pytest.raises(ValueError, match="exists already"):
        store.create_token("ann")
    store.ping()


def test_token_answers_are_reused_for_at_most_max_age(store):
    """The API asks on every request, with a max_age: a token deleted or revoked by another process
    fails from the first lookup older than that; one revoked through this store fails at once."""
    token, secret = store.create_token("ann")
    assert store.check_token(secret, max_age=60).id == token.id          # looked up (and remembered)
    with store.engine.begin() as c:
        c.execute(sa.text("DELETE FROM tokens"))                          # deleted elsewhere
    assert store.check_token(secret, max_age=60).id == token.id          # the answer of a moment ago
    assert store.check_token(secret, max_age=0) is None                  # looked up again
    assert store.check_token(secret, max_age=60) is None                 # and not remembered any more
    _, bob = store.create_token("bob")
    assert store.check_token(bob, max_age=60).name == "bob"
    other = Store(store.url, migrate=False)                               # another process revokes it
    try:
        assert other.revoke_token("bob").name == "bob"
    finally:
        other.engine.dispose()
    assert store.check_token(bob, max_age=60).name == "bob"
    with pytest.raises(TokenRefused, match="'bob' was revoked on") as refused:
        store.authenticate(bob, max_age=0)
    assert refused.value.reason == "revoked"
    _, cy = store.create_token("cy")
    assert store.check_token(cy, max_age=60).name == "cy"
    store.revoke_token("cy")                                              # through this store: at once
    assert store.check_token(cy, max_age=60) is None


# ---------------------------------------------------------------- the recorder

def model(kind, phase, name, parents=()):
    return ModelRecord(id=uuid.uuid4().hex, kind=kind, phase=phase, name=name, uri=f"mem://{name}", size_bytes=10,
                       sha256="0" * 64, sparsity=0.5 * phase, nonzeros=100, metrics={"test_accuracy": 0.9},
                       parents=list(parents))


def feed_job(store, job_id, phases=2, ingredients=2):
    """The calls the pipeline makes for a job (no training needed for the store)."""
    rec = DBRecorder(store, job_id)
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
        rec.event(f"phase {t}: pruned", phase=t)
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
        rec.phase_finished(PhaseSummary(phase=t, target_sparsity=0.5 * t, sparsity=0.5 * t, model_id=soup.id,
                                        seconds={"total": 1.5}, metrics={"soup_accuracy": 0.9,
                                                                         "ingredient_accuracies": [0.9] * ingredients}))
        all_models += [pruned, *ings, soup]
        parent = soup
    return all_models


def test_lineage_dag_through_phases(store):
    job = store.create_job(SPEC)
    models = feed_job(store, job.id)
    by_name = {m.name: m.id for m in models}
    lin = store.lineage(by_name["phase2/soup"])
    assert len(lin["nodes"]) == 1 + 2 * (1 + 2 + 1) and {n.id for n in lin["nodes"]} == set(by_name.values())
    assert lin["nodes"][0].name == "phase0/dense" and lin["nodes"][0].kind == "dense"
    expected = set()
    for t, parent in ((1, "phase0/dense"), (2, "phase1/soup")):
        expected.add((parent, f"phase{t}/pruned", "pruned_from"))
        for i in range(2):
            expected.add((f"phase{t}/pruned", f"phase{t}/ingredient{i}", "retrained_from"))
            expected.add((f"phase{t}/ingredient{i}", f"phase{t}/soup", "averaged_from"))
    expected = {(by_name[p], by_name[c], k) for p, c, k in expected}
    assert {(e["parent"], e["child"], e["kind"]) for e in lin["edges"]} == expected
    assert len(lin["edges"]) == len(expected) == 10

    down = store.descendants(by_name["phase0/dense"])
    assert {n.id for n in down["nodes"]} == set(by_name.values())
    assert {(e["parent"], e["child"], e["kind"]) for e in down["edges"]} == expected

    mid = store.lineage(by_name["phase1/ingredient0"])
    assert {n.name for n in mid["nodes"]} == {"phase0/dense", "phase1/pruned", "phase1/ingredient0"}
    assert {n.name for n in store.descendants(by_name["phase2/ingredient1"])["nodes"]} == \
        {"phase2/ingredient1", "phase2/soup"}
    assert store.lineage("nope") == {"nodes": [], "edges": []}
    assert store.get_model(by_name["phase1/soup"]).kind == "soup"

    phases = store.phases(job.id)
    assert [(p.index, p.status) for p in phases] == [(0, "succeeded"), (1, "succeeded"), (2, "succeeded")]
    assert phases[1].pruned_model_id == by_name["phase1/pruned"] and phases[1].model_id == by_name["phase1/soup"]
    assert phases[2].seconds == {"total": 1.5} and phases[2].metrics["ingredient_accuracies"] == [0.9, 0.9]
    assert store.get_job(job.id).current_phase == 2
    assert [r.name for r in store.runs(job.id, kind="dense")] == ["dense"]
    assert len(store.runs(job.id, kind="ingredient")) == 4


def test_metrics_progress_and_reads(store):
    job = store.create_job(SPEC)
    rec = DBRecorder(store, job.id)
    rec.job_started(SPEC, total_epochs=4)
    rec.phase_started(0, 0.0)
    rec.run_started(RunRecord("dense", "dense", 0, {}))
    progress = []
    for e in (1, 2, 3, 4):
        rec.metric("dense", {"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "lr": 0.1, "flag": True,
                             "note": "text", "bad": float("nan")})
        progress.append(store.get_job(job.id).progress)
    assert progress == [0.25, 0.5, 0.75, 0.99]                          # capped until the job succeeds
    rows = store.metrics(job.id, run_name="dense", name="train_loss")
    assert [(r["run"], r["epoch"], r["step"], r["value"]) for r in rows] == \
        [("dense", e, 10 * e, 1.0 / e) for e in (1, 2, 3, 4)]
    assert rows[0]["time"].tzinfo == timezone.utc
    assert {r["name"] for r in store.metrics(job.id)} == {"train_loss", "lr"}   # numbers only
    assert count(store, Metric, job_id=job.id) == 8
    store.job_succeeded(job.id, "m")
    done = store.get_job(job.id)
    assert (done.status, done.progress, done.final_model_id, done.done_epochs) == ("succeeded", 1.0, "m", 4)


def test_resumed_calls_create_no_duplicate_rows(store):
    job = store.create_job(SPEC)
    feed_job(store, job.id)
    tables = (Phase, Run, Model, ModelEdge, Metric)
    before = {t.__tablename__: count(store, t) for t in tables}
    done_before = store.get_job(job.id).done_epochs
    # a second driver: phase 2 again, ingredient 0 again from scratch, ingredient 1 from its epoch-1 checkpoint
    rec = DBRecorder(store, job.id)
    rec.job_started(SPEC, 10)
    rec.phase_started(2, 0.75)
    rec.run_started(RunRecord("phase2/ingredient0", "ingredient", 2, {"seed": 0}))
    rec.run_started(RunRecord("phase2/ingredient1", "ingredient", 2, {"seed": 1}))
    rec.metric("phase2/ingredient0", {"epoch": 1, "step": 5, "train_loss": 0.25})
    rec.metric("phase2/ingredient1", {"epoch": 2, "step": 10, "train_loss": 0.125})
    assert {t.__tablename__: count(store, t) for t in tables} == dict(before, metrics=before["metrics"] - 2)
    assert store.get_job(job.id).done_epochs == done_before              # no epoch counted twice
    phase2 = store.phases(job.id)[2]
    assert (phase2.status, phase2.target_sparsity, phase2.finished_at) == ("running", 0.75, None)
    run = next(r for r in store.runs(job.id) if r.name == "phase2/ingredient0")
    assert (run.attempts, run.status, run.model_id, run.finished_at) == (2, "running", None, None)
    curve = store.metrics(job.id, run_name="phase2/ingredient1", name="train_loss")
    assert [(r["epoch"], r["value"]) for r in curve] == [(1, 0.5), (2, 0.125)]   # epoch 1 kept, 2 replaced
    assert [r.name for r, _ in store.finished_ingredients(job.id, 1)] == ["phase1/ingredient0", "phase1/ingredient1"]
    assert store.finished_ingredients(job.id, 2) == []
    assert [p.index for p in store.completed_phases(job.id)] == [0, 1]


def test_model_saved_again_replaces_an_unreferenced_model(store):
    """The driver died between saving a model and recording what it is for: its successor saves a
    new model of the same name, which replaces the old row and its edges."""
    job = store.create_job(SPEC)
    rec = DBRecorder(store, job.id)
    rec.job_started(SPEC, 1)
    dense = model("dense", 0, "phase0/dense")
    rec.model_saved(dense)
    rec.run_started(RunRecord("phase1/ingredient0", "ingredient", 1, {}))
    pruned = model("pruned", 1, "phase1/pruned", [(dense.id, "pruned_from")])
    rec.model_saved(pruned)
    lost = model("ingredient", 1, "phase1/ingredient0", [(pruned.id, "retrained_from")])
    rec.model_saved(lost)
    redo = model("ingredient", 1, "phase1/ingredient0", [(pruned.id, "retrained_from")])
    rec.model_saved(redo)
    assert store.get_model(lost.id) is None and store.get_model(redo.id).name == "phase1/ingredient0"
    assert [(e["parent"], e["child"]) for e in store.descendants(pruned.id)["edges"]] == [(pruned.id, redo.id)]


def test_a_model_name_in_use_clashes_and_nothing_is_half_written(store):
    job = store.create_job(SPEC)
    rec = DBRecorder(store, job.id)
    rec.job_started(SPEC, 1)
    dense = model("dense", 0, "phase0/dense")
    rec.model_saved(dense)
    rec.model_saved(model("pruned", 1, "phase1/pruned", [(dense.id, "pruned_from")]))   # dense now has a child
    edges = count(store, ModelEdge)
    clash = model("dense", 0, "phase0/dense")
    clash.parents = [(store.get_model_by_name(job.id, "phase1/pruned").id, "pruned_from")]
    with pytest.raises(sa.exc.IntegrityError):
        rec.model_saved(clash)
    assert store.get_model(clash.id) is None and store.get_model(dense.id) is not None
    assert count(store, ModelEdge) == edges and count(store, Model) == 2

    orphan = model("pruned", 2, "phase2/pruned", [(dense.id, "pruned_from"), ("no-such-parent", "pruned_from")])
    with pytest.raises(sa.exc.IntegrityError):
        rec.model_saved(orphan)                   # the second edge's parent does not exist
    assert store.get_model(orphan.id) is None     # the model and its first edge were rolled back with it
    assert count(store, ModelEdge) == edges and count(store, Model) == 2


def test_events_in_order_with_cursor(store):
    job = store.create_job(SPEC)
    rec = DBRecorder(store, job.id)
    for i in range(5):
        rec.event(f"e{i}", phase=i, level="warning" if i == 3 else "info")
    first = store.events(job.id, limit=2)
    rest = store.events(job.id, after_id=first[-1].id)
    assert [e.message for e in first + rest] == [f"e{i}" for i in range(5)]
    assert rest[1].level == "warning" and rest[1].phase == 3
    assert store.events(job.id, after_id=rest[-1].id) == []
    with pytest.raises(sa.exc.IntegrityError):
        rec.event("x", level="loud")              # CHECK constraint
    assert count(store, Event) == 5


def test_nan_metrics_are_stored_as_null(store):
    job = store.create_job(SPEC)
    rec = DBRecorder(store, job.id)
    rec.job_started(SPEC, 1)
    m = model("dense", 0, "phase0/dense")
    m.metrics = {"val_accuracy": float("nan"), "test_accuracy": 0.5, "per_layer": [float("inf"), 0.5]}
    rec.model_saved(m)
    assert store.get_model(m.id).metrics == {"val_accuracy": None, "test_accuracy": 0.5, "per_layer": [None, 0.5]}


def test_deleting_a_job_cascades(store):
    job = store.create_job(SPEC)
    feed_job(store, job.id, phases=1)
    with store.tx() as s:
        s.execute(sa.delete(Base.metadata.tables["jobs"]).where(sa.column("id") == job.id))
    assert all(count(store, t) == 0 for t in (Phase, Run, Model, ModelEdge, Metric, Event))


# ---------------------------------------------------------------- tokens: expiry and revocation (issue 15)

def test_tokens_expire_are_revoked_and_listed(store):
    from service.orm import utcnow
    _, old = store.create_token("old", admin=True, expires_at=utcnow() - timedelta(seconds=1))
    with pytest.raises(TokenRefused, match="'old' expired on") as refused:
        store.authenticate(old)
    assert refused.value.reason == "expired" and not store.has_admin_token()      # an expired admin is no admin
    _, brief = store.create_token("brief", expires_at=utcnow() + timedelta(seconds=0.5))
    assert store.check_token(brief, max_age=60).name == "brief"                   # remembered for a minute ...
    time.sleep(0.6)
    with pytest.raises(TokenRefused, match="expired"):
        store.authenticate(brief, max_age=60)                                     # ... but never past its expiry
    root, root_secret = store.create_token("root", admin=True)
    assert store.has_admin_token()
    ann, _ = store.create_token("ann")
    revoked = store.revoke_token(ann.id)                                          # by id
    assert revoked.revoked_at is not None and store.revoke_token(ann.id).revoked_at == revoked.revoked_at
    assert store.revoke_token("no-such-token") is None
    ann2, ann2_secret = store.create_token("ann")                 # a revoked token's name can be given again
    assert store.revoke_token("ann").id == ann2.id                # by name: the one not revoked
    assert store.revoke_token("root").id == root.id and not store.has_admin_token()
    with pytest.raises(TokenRefused, match="revoked"):
        store.authenticate(root_secret)
    listed = store.list_tokens()
    assert [t.name for t in listed] == ["old", "brief", "root", "ann", "ann"]     # oldest first, all of them
    assert [t.revoked_at is not None for t in listed] == [False, False, True, True, True]
    assert listed[1].expires_at is not None and all(len(t.last4) == 4 for t in listed)


def test_an_active_name_is_unique_and_a_revoked_admin_secret_stays_revoked(store):
    store.create_token("ann")
    with store.engine.begin() as c:                # the partial unique index, not only the store's check
        with pytest.raises(sa.exc.IntegrityError):
            c.execute(sa.text("INSERT INTO tokens (id, name, token_hash, admin, created_at) "
                              "VALUES ('x', 'ann', 'h', false, CURRENT_TIMESTAMP)"))
    store.ensure_token("admin", "deploy-secret-0123456789", admin=True)
    store.revoke_token("admin")
    with pytest.raises(ValueError, match="revoked"):
        store.ensure_token("admin", "deploy-secret-0123456789", admin=True)          # not brought back
    assert store.check_token("deploy-secret-0123456789") is None and not store.has_admin_token()
    store.ensure_token("admin", "new-deploy-secret-0123456789", admin=True)           # a new secret is fine
    assert store.check_token("new-deploy-secret-0123456789").admin


def test_token_expiry_and_revocation_columns_come_and_go(fresh_db):
    """Migration 0007 on a database with a token: it gains expires_at, revoked_at and last4 (null), and
    a name is unique among tokens not revoked only; downgrading deletes the revoked and expired tokens
    (before 0007 every stored token is good) and makes names unique again."""
    engine, migrate = fresh_db
    t = migrate("0006").tables["tokens"]
    now = datetime.now(timezone.utc)
    with engine.begin() as c:
        c.execute(t.insert().values(id="a", name="ann", token_hash="ha", admin=True, created_at=now))
    t = migrate("head").tables["tokens"]
    with engine.begin() as c:
        assert c.execute(sa.select(t.c.expires_at, t.c.revoked_at, t.c.last4)).one() == (None, None, None)
        c.execute(t.update().values(revoked_at=now))                          # ann's token revoked ...
        c.execute(t.insert().values(id="b", name="ann", token_hash="hb", admin=False, created_at=now))
        c.execute(t.insert().values(id="c", name="cy", token_hash="hc", admin=False, created_at=now,
                                    expires_at=now - timedelta(hours=1)))
        c.execute(t.insert().values(id="d", name="dee", token_hash="hd", admin=False, created_at=now,
                                    expires_at=now + timedelta(hours=1), last4="wxyz"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as c:          # ... and the new one holds the name
        c.execute(t.insert().values(id="e", name="ann", token_hash="he", admin=False, created_at=now))
    t = migrate("0006", down=True).tables["tokens"]
    assert {"expires_at", "revoked_at", "last4"}.isdisjoint(t.c.keys())
    with engine.begin() as c:
        assert sorted(c.execute(sa.select(t.c.id, t.c.name)).all()) == [("b", "ann"), ("d", "dee")]
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as c:
        c.execute(t.insert().values(id="e", name="dee", token_hash="he", admin=False, created_at=now))
    t = migrate("head").tables["tokens"]                                      # and up again
    assert {"expires_at", "revoked_at", "last4"} <= set(t.c.keys())


def test_measurements_merge_into_a_models_metrics(store):
    """Measurements taken after a model was saved (export sizes, latency, a robustness curve) merge
    into its metrics: new keys are added, a key measured again is replaced, the rest is kept."""
    job = store.create_job(SPEC)
    rec = DBRecorder(store, job.id)
    rec.job_started(SPEC, 1)
    dense = model("dense", 0, "phase0/dense")
    rec.model_saved(dense)
    before = dict(store.get_model(dense.id).metrics)
    store.add_model_metrics(dense.id, sizes={"dense": 100})
    store.add_model_metrics(dense.id, sizes={"dense": 100, "sparse": 14}, robustness=[[0.5, 0.9]])
    assert store.get_model(dense.id).metrics == {**before, "sizes": {"dense": 100, "sparse": 14},
                                                 "robustness": [[0.5, 0.9]]}
    assert store.add_model_metrics("no-such-model", sizes={}) is None
