"""The Ray job entrypoint: `python -m service.driver JOB_ID`.

Runs one job's pipeline with the Ray executor (warm actors) and the DB recorder. A driver started
for a job that already has completed phases (its previous driver died) resumes after the last
completed one and reuses what the interrupted phase had finished.
"""

from __future__ import annotations

import sys

from service.artifacts import ArtifactStore
from service.pipeline import ModelRecord, PhaseSummary, Pipeline, ResumePoint
from service.settings import get_settings
from service.spec import JobSpec
from service.store import Store

TERMINAL = ("succeeded", "failed", "cancelled")


def model_record(row) -> ModelRecord:
    return ModelRecord(id=row.id, kind=row.kind, phase=row.phase, name=row.name, uri=row.uri,
                       size_bytes=row.size_bytes, sha256=row.sha256, sparsity=row.sparsity, nonzeros=row.nonzeros,
                       metrics=dict(row.metrics or {}), parents=[])


def phase_summary(row) -> PhaseSummary:
    return PhaseSummary(phase=row.index, target_sparsity=row.target_sparsity, sparsity=row.sparsity,
                        pruned_accuracy=row.pruned_accuracy, ingredient_accuracies=list(row.ingredient_accuracies or []),
                        soup_accuracy=row.soup_accuracy, soup_val_accuracy=row.soup_val_accuracy,
                        gain_over_best=row.gain_over_best, gain_over_mean=row.gain_over_mean, norm_drop=row.norm_drop,
                        mean_pairwise_distance=row.mean_pairwise_distance,
                        soup_ingredients=list(row.soup_ingredients or []), model_id=row.model_id,
                        seconds=dict(row.seconds or {}), ensemble_accuracy=row.ensemble_accuracy,
                        cpu_seconds=row.cpu_seconds, gpu_seconds=row.gpu_seconds, epochs_trained=row.epochs_trained)


def resume_point(store: Store, job_id: str) -> ResumePoint | None:
    """Where a job continues: after its last completed phase (None: from the start)."""
    done = store.completed_phases(job_id)
    if not done:
        return None
    nxt = len(done)
    pruned = store.get_model_by_name(job_id, f"phase{nxt}/pruned")
    return ResumePoint(phases=[phase_summary(p) for p in done],
                       parent=model_record(store.get_model(done[-1].model_id)),
                       pruned=model_record(pruned) if pruned else None,
                       ingredients={run.name: model_record(m) for run, m in store.finished_ingredients(job_id, nxt)},
                       searched=next((r.config["config"] for r in store.runs(job_id, kind="search_trial")
                                      if r.phase == nxt and r.status == "succeeded" and r.metrics.get("chosen")), None))


def run_job(job_id: str) -> int:
    import ray

    from service.executors import RayExecutor

    settings = get_settings()
    store = Store(settings.database_url, migrate=False)
    job = store.get_job(job_id)
    if job is None:
        print(f"no job {job_id} in {settings.database_url}", file=sys.stderr)
        return 2
    if job.status in TERMINAL:
        print(f"job {job_id} is already {job.status}", file=sys.stderr)
        return 0
    spec = JobSpec.model_validate(job.spec)
    ray.init(log_to_driver=False)          # inside a Ray job: the cluster that runs it
    executor = RayExecutor(cpus=spec.resources.cpus_per_ingredient, gpus=spec.resources.gpus_per_ingredient)
    if not (spec.search and spec.search.applies(1)):      # a search frees the pool first: no use warming it
        executor.warm_up(min(executor.slots, spec.soup.ingredients), wait=False)   # workers start while phase 0 runs
    resume = resume_point(store, job_id)
    pipeline = Pipeline(spec, executor, store.recorder(job_id), ArtifactStore(settings.artifacts),
                        prefix=f"jobs/{job_id}", resume=resume, epoch_checkpoints=True)
    try:
        result = pipeline.run()
    except Exception as e:
        store.job_failed(job_id, f"{type(e).__name__}: {e}")
        raise
    finally:
        executor.shutdown()
    store.job_succeeded(job_id, result.final_model_id)
    return 0


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m service.driver JOB_ID", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run_job(sys.argv[1]))


if __name__ == "__main__":
    main()
