"""The Ray job entrypoint: `python -m service.driver JOB_ID [SUBMISSION_ID]`.

Runs one job's pipeline with the Ray executor (warm actors) and the DB recorder. A driver started
for a job that already has completed phases (its previous driver died) resumes after the last
completed one and reuses what the interrupted phase had finished.

A driver knows its submission id: once the job has been given to another submission (its Ray head
died and the job was requeued, say) the old driver cannot start it or fail it any more.
"""

from __future__ import annotations

import sys
import time

import sqlalchemy as sa

from service.access import Access
from service.artifacts import ArtifactStore
from service.pipeline import Pipeline
from service.records import JobResult, Recorder, ResumePoint
from service.settings import get_settings
from service.spec import JobSpec
from service.states import TERMINAL, StateError
from service.store import JobCancelled, Store
from service.store.convert import model_record, phase_summary, search_trial
from service.recorders import DBRecorder
from workers.process import peak_rss_bytes


def resume_point(store: Store, job_id: str) -> ResumePoint | None:
    """Where a job continues: after its last completed phase (None: from the start)."""
    done = store.completed_phases(job_id)
    if not done:
        return None
    nxt = len(done)
    started = next((p for p in store.phases(job_id) if p.index == nxt), None)
    pruned = store.get_model(started.pruned_model_id) if started is not None and started.pruned_model_id else None
    return ResumePoint(phases=[phase_summary(p) for p in done],
                       parent=model_record(store.get_model(done[-1].model_id)),
                       pruned=model_record(pruned) if pruned else None,
                       ingredients={run.name: model_record(m) for run, m in store.finished_ingredients(job_id, nxt)},
                       searched=next((tr.config for tr in map(search_trial, store.runs(job_id, kind="search_trial"))
                                      if tr.phase == nxt and tr.status == "succeeded" and tr.chosen), None))


def stored_spec(data: dict, store: Store | None = None) -> JobSpec:
    """A job's stored spec, validated again: what it names (data roots, import allow-list, the caller's
    models; service.access) was checked when it was submitted, and is not again here, where the API's
    settings need not be known."""
    return JobSpec.model_validate(data, context={"access": Access.of_stored(store=store)})


def run_job(job_id: str, submission: str | None = None) -> int:
    import ray

    from service.executors import RayExecutor

    settings = get_settings()
    store = Store(settings.database_url, migrate=False)
    job = store.get_job(job_id)
    if job is None:
        print(f"no job {job_id} in {sa.engine.make_url(settings.database_url)!r}", file=sys.stderr)   # password hidden
        return 2
    if job.status in TERMINAL:
        print(f"job {job_id} is already {job.status}", file=sys.stderr)
        return 0
    spec = stored_spec(job.spec, store)
    ray.init(log_to_driver=False)          # inside a Ray job: the cluster that runs it
    recorder = DBRecorder(store, job_id, submission=submission)
    executor = RayExecutor(cpus=spec.resources.cpus_per_ingredient, gpus=spec.resources.gpus_per_ingredient,
                           unschedulable_timeout=settings.unschedulable_timeout,
                           on_wait=lambda message: recorder.event(message, level="warning"))
    if not (spec.search and spec.search.applies(1)):      # a search frees the pool first: no use warming it
        executor.warm_up(min(executor.slots, spec.soup.ingredients), wait=False)   # workers start while phase 0 runs
    resume = resume_point(store, job_id)
    artifacts = ArtifactStore(settings.artifacts, max_checkpoint_bytes=settings.max_checkpoint_bytes)
    pipeline = Pipeline(spec, executor, recorder, artifacts,
                        prefix=f"jobs/{job_id}", resume=resume, epoch_checkpoints=True)
    try:
        result = pipeline.run()
    except (JobCancelled, StateError) as e:   # cancelled, or given to another driver: leave it as it is
        print(f"not running job {job_id}: {e}", file=sys.stderr)
        return 0
    except Exception as e:
        if store.job_failed(job_id, f"{type(e).__name__}: {e}", submission=submission) is not None:
            _report(recorder)                         # (None: the job is no longer this driver's)
        raise
    finally:
        executor.shutdown()
    _report(recorder)
    store.job_succeeded(job_id, result.final_model_id)
    return 0


def run_in_process(spec: JobSpec, models: str, recorder: Recorder, *, resume: ResumePoint | None = None,
                   prefix: str = "") -> JobResult:
    """A job run to its end in this process, every unit of work here (SequentialExecutor), its models under
    `models` (a folder or fsspec URL; LADLE_MAX_CHECKPOINT_BYTES applies), its progress to `recorder`: the one
    in-process runner (`ladle run --local`, the benchmarks). The driver above is the same pipeline on Ray."""
    from service.executors import SequentialExecutor
    artifacts = ArtifactStore(models, max_checkpoint_bytes=get_settings().max_checkpoint_bytes)
    return Pipeline(spec, SequentialExecutor(), recorder, artifacts, prefix=prefix, resume=resume).run()


def footprint() -> dict[str, float | bool]:
    """This process's own figures: CPU-seconds, peak RSS (MB), and whether torch was ever imported
    (a driver only coordinates: every tensor step runs on the job's workers)."""
    return {"cpu_seconds": time.process_time(), "peak_rss_mb": (peak_rss_bytes() or 0) / 2**20,
            "torch": "torch" in sys.modules}


def _report(recorder: DBRecorder) -> None:
    f = footprint()
    recorder.event(f"driver: {f['cpu_seconds']:.1f} CPU-seconds, peak RSS {f['peak_rss_mb']:.0f} MB, torch "
                   + ("loaded" if f["torch"] else "not loaded"), level="warning" if f["torch"] else "info")


def main() -> None:
    if len(sys.argv) not in (2, 3):
        print("usage: python -m service.driver JOB_ID [SUBMISSION_ID]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run_job(*sys.argv[1:]))


if __name__ == "__main__":
    main()
