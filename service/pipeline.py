"""The phase pipeline of a job (design section 2, step 3).

phase 0: the given dense checkpoint, or a dense model trained within its budget (schedule recorded);
phase t = 1..T: prune the previous soup to sparsity 1 - (1 - p)^t -> m ingredient retrainings (run by
an `Executor`) -> soup (uniform or greedy) -> BatchNorm recalibration -> evaluation -> the soup is
the parent of the next phase. Everything that happens is reported to a `Recorder`.

Every tensor step runs as a unit of work (workers.units) through the executor, on the job's workers:
phase 0's scoring and robustness curve, pruning, the soup. Models travel as artifact URLs. The driver
that runs this loop holds no model and does not import torch (design section 9): it records,
coordinates and decides.

This module is the loop only. What it runs is planned in service.plan (configs, seeds, tasks), the
records it reports and the two protocols it works against are in service.records, the executors in
service.executors, the recorders in service.recorders.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.artifacts import ArtifactStore
from service.plan import (PhaseStart, RetrainConfig, dense_history, dense_optimizer, dense_task, ingredient_settings,
                          phase_seed, prune_seed, retrain_config, retrain_peak_lr, retrain_task, task_spec,
                          total_epochs)
from service.records import (METRICS, Compute, Executor, JobResult, Metric, ModelRecord, PhaseSummary, Recorder,
                             ResumePoint, RunRecord, SearchTrial, phase_metrics, run_metrics, structure_line)
from service.spec import JobSpec
from workers.config import CheckpointMeta, SavedModel, TrainingDiverged, per_phase_rate, sparsity_after, suggested_lr
from workers.units import (Curve, Describe, Finish, LoadModel, ModelOut, Prune, Robustness, Soup, Step, StepOut,
                           TaskInfo, TaskSpec, TrainTask)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


class PhaseFailed(RuntimeError):
    """Too few ingredients of a phase finished to make a soup."""


@dataclass
class _Context:
    task: TaskSpec                         # how a worker builds the job's model and data
    info: TaskInfo                         # what a worker found out about it (workers.units.Describe)
    metric: Metric                         # its primary metric
    dense_lrs: list[float]
    dense_epochs: int
    meta: dict[str, Any]
    dense_source: str | None = None        # where dense_lrs came from, when it is worth an event
    eta_max: float = 0.0                   # the retraining schedules' peak LR when retrain.lr is null

    def key(self, template: str) -> str:
        return self.metric.key(template)

    def test(self, scores: dict[str, Any]) -> float | None:
        """The primary metric on the test split, from a run's or a model's scores."""
        return scores.get(self.key("test_{m}"))


def _hint(spec: JobSpec, error: BaseException, *, dense: bool) -> str:
    """Where to change the LR of a run that diverged."""
    if not isinstance(error, TrainingDiverged):
        return ""
    if dense:
        lr = suggested_lr(spec.model.arch)
        return f" (dense.lr is {spec.dense.lr:g}" + (f"; {spec.model.arch} trains well at {lr:g}" if lr else "") + ")"
    return f" (the retraining LR: retrain.lr, or the dense peak LR {spec.dense.lr:g} when it is null)"


class Pipeline:
    """Runs one job: `Pipeline(spec, executor, recorder, artifacts).run()`."""

    def __init__(self, spec: JobSpec, executor: Executor, recorder: Recorder, artifacts: ArtifactStore,
                 *, prefix: str = "", resume: ResumePoint | None = None, epoch_checkpoints: bool = False):
        self.spec, self.executor, self.recorder, self.artifacts = spec, executor, recorder, artifacts
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.resume = resume
        self.epoch_checkpoints = epoch_checkpoints   # for executors that retry a task after its worker died
        self.task = task_spec(spec)

    # -- plumbing
    def _url(self, name: str) -> str:
        return self.artifacts.uri(f"{self.prefix}{name}.safetensors")

    def _probs_url(self, name: str) -> str:
        """Where an ingredient's test softmax is kept, beside its checkpoint (for the prediction ensemble)."""
        return self.artifacts.uri(f"{self.prefix}{name}.probs.safetensors")

    @staticmethod
    def _meta(ctx: _Context, model_id: str, kind: str, phase: int, name: str,
              parents: list[tuple[str, str]]) -> dict[str, Any]:
        return dict(ctx.meta, model_id=model_id, kind=kind, phase=phase, name=name,
                    parents=[{"id": p, "kind": k} for p, k in parents])

    def _record(self, saved: SavedModel, meta: dict[str, Any], metrics: dict[str, Any]) -> ModelRecord:
        """Record a saved model with its lineage edges (from its `meta`)."""
        rec = ModelRecord(id=meta["model_id"], kind=meta["kind"], phase=meta["phase"], name=meta["name"],
                          uri=saved.uri, size_bytes=saved.size_bytes, sha256=saved.sha256, sparsity=saved.sparsity,
                          nonzeros=saved.nonzeros, metrics=dict(metrics, layer_sparsity=saved.layer_sparsity,
                                                                parameters=saved.parameters),
                          parents=[(p["id"], p["kind"]) for p in meta["parents"]])
        self.recorder.model_saved(rec)
        return rec

    def _step(self, step: Step, compute: Compute, in_process: Compute) -> StepOut:
        """Run one step through the executor (on a worker, or here for an in-process executor); add what
        it consumed to the phase's `compute`; raise what ended it."""
        step.threads = max(1, int(self.spec.resources.cpus_per_ingredient))
        step.gpus = self.spec.resources.gpus_per_ingredient
        [out] = self.executor.run([step], self.recorder.metric)
        if isinstance(out, BaseException):
            raise out
        compute.add(out.cpu_seconds, out.gpu_seconds)
        if self.executor.in_process:
            in_process.add(out.cpu_seconds)
        return out

    def _driver_share(self, compute: Compute, cpu0: float, in_process: Compute, timing: dict[str, float]) -> None:
        """Add the driver's own CPU time since `cpu0` to `compute` and to the phase's `timing` (as
        `driver_cpu`), less what units of work run in this process consumed (counted already)."""
        timing["driver_cpu"] = own = max(0.0, time.process_time() - cpu0 - in_process.cpu_seconds)
        compute.add(own)

    # -- phase 0
    def _robustness(self, ctx: _Context, curve: Curve | None, timing: dict[str, float]) -> dict[str, Any]:
        """The dense model's one-shot robustness curve (workers.robustness, measured by a step over
        `prune.robustness`), as metrics of the dense model (`robustness`: the points, `robustness_split`:
        the split scored); an event says what was measured. Nothing when the spec turns it off or the
        task does not measure it. Part of phase 0: a job resumed after phase 0 has it already."""
        grid = self.spec.prune.robustness
        if not grid or curve is None:
            return {}
        if curve.points is None:
            self.recorder.event(f"phase 0: no one-shot robustness curve: the {ctx.metric.name} task does not "
                                "measure it", phase=0)
            return {}
        timing["robustness"] = curve.seconds
        points, m = curve.points, ctx.metric.name
        if not points:
            self.recorder.event(f"phase 0: no one-shot robustness curve: the model is sparser than every sparsity "
                                f"of prune.robustness {grid}", phase=0)
            return {}
        recal = " and BatchNorm recalibration" if any(f"{m}_raw" in p for p in points) else ""
        ends = f"{points[0][m]:.4f} at sparsity {points[0]['sparsity']:g}"
        if len(points) > 1:
            ends += f", {points[-1][m]:.4f} at {points[-1]['sparsity']:g}"
        how = ("removing that share of the channels (by L2 norm)" if self.spec.prune.structure != "unstructured"
               else "magnitude pruning")
        self.recorder.event(f"phase 0: one-shot robustness curve measured at {len(points)} sparsities "
                            f"({curve.split} {m} after {how}{recal}, no retraining: {ends}) "
                            f"in {curve.seconds:.1f} s", phase=0)
        return {"robustness": points, "robustness_split": curve.split}

    def _dense(self, ctx: _Context) -> tuple[ModelRecord, PhaseSummary]:
        spec = self.spec
        self.recorder.phase_started(0, 0.0)
        t0, cpu0 = time.perf_counter(), time.process_time()
        compute, in_process = Compute(), Compute()
        timing: dict[str, float] = {}
        grid = list(spec.prune.robustness or [])
        recal = spec.soup.bn_recalibration_fraction
        if ctx.info.pretrained or spec.model.checkpoint:
            source = None if ctx.info.pretrained else spec.model.checkpoint
            meta = self._meta(ctx, uuid.uuid4().hex, "dense", 0, "phase0/dense", [])
            out = self._step(LoadModel(name="phase0/load", task=ctx.task, source=source, url=self._url("phase0/dense"),
                                       meta=meta, grid=grid, recal_fraction=recal,
                                       max_checkpoint_bytes=getattr(self.artifacts, "max_checkpoint_bytes", None)),
                             compute, in_process)
            assert isinstance(out, ModelOut) and out.saved is not None
            self.recorder.event(f"phase 0: the pretrained model {spec.model.arch}" if source is None
                                else f"phase 0: loaded dense checkpoint {spec.model.checkpoint}", phase=0)
            rec = self._record(out.saved, meta, dict(out.scores, **self._robustness(ctx, out.curve, timing)))
        else:
            meta = self._meta(ctx, uuid.uuid4().hex, "dense", 0, "phase0/dense", [])
            task = dense_task(spec, ctx.dense_lrs, Finish(url=self._url("phase0/dense"), meta=meta))
            self.recorder.run_started(RunRecord("dense", "dense", 0, {"epochs": spec.dense.epochs,
                                                                      "lr": spec.dense.lr,
                                                                      "warmup": spec.dense.warmup,
                                                                      "schedule": spec.dense.schedule,
                                                                      "seed": spec.seed,
                                                                      "optimizer": ctx.meta.get("dense_optimizer")}))
            [trained] = self.executor.run([task], self.recorder.metric)
            if isinstance(trained, BaseException):
                self.recorder.run_finished("dense", "failed", error=repr(trained))
                msg = f"dense training failed: {trained}{_hint(spec, trained, dense=True)}"
                self.recorder.event(f"phase 0: {msg}", level="error", phase=0)
                raise RuntimeError(msg) from trained
            compute.add_outcome(trained)
            if self.executor.in_process:
                in_process.add_outcome(trained)
            curve = None
            if grid:
                curve = self._step(Robustness(name="phase0/robustness", task=ctx.task, url=trained.saved.uri,
                                              grid=grid, recal_fraction=recal), compute, in_process).curve
            rec = self._record(trained.saved, meta, dict(trained.scores, **self._robustness(ctx, curve, timing)))
            self.recorder.run_finished("dense", "succeeded", model_id=rec.id, metrics=run_metrics(trained))
        self._driver_share(compute, cpu0, in_process, timing)
        summary = PhaseSummary(phase=0, target_sparsity=0.0, sparsity=rec.sparsity, model_id=rec.id,
                               seconds=dict(timing, total=time.perf_counter() - t0),
                               metrics=phase_metrics(ctx.metric, {
                                   "soup_{m}": ctx.test(rec.metrics), "soup_val_{m}": rec.metrics.get(ctx.key("val_{m}")),
                                   **compute.as_metrics()}))
        self.recorder.phase_finished(summary)
        return rec, summary

    # -- the schedule search of a phase
    def _search(self, ctx: _Context, t: int, make_task: Callable[..., TrainTask]) -> tuple[RetrainConfig, Compute]:
        """Trial 0 is the spec's own retraining config, the others sample `search.space` (seeded by the
        job's seed and the phase). All trials start from the same pruned model with the same seed, so
        they differ only in their config. Returns the config of the best trial by `search.metric` (its
        last reported value; a trial that ASHA stopped early reports fewer epochs), and what the trials
        consumed (from each trial's last epoch row)."""
        sp, rec = self.spec.search, self.recorder
        assert sp is not None
        default = retrain_config(self.spec, ctx.eta_max, seed=phase_seed(self.spec, t))
        rng = random.Random(phase_seed(self.spec, t))
        configs = [default] + [default.with_(**sp.space.sample(rng)) for _ in range(sp.trials - 1)]
        searched = [k for k in ("schedule", "lr", "epochs", "weight_decay") if getattr(sp.space, k) is not None]
        trials = [SearchTrial(phase=t, index=i, name=f"phase{t}/search/trial{i}", status="running", config=c.as_dict(),
                              searched={k: getattr(c, k) for k in searched}, default=i == 0)
                  for i, c in enumerate(configs)]
        tasks = [make_task(tr.name, c, tr.run_config()) for tr, c in zip(trials, configs)]
        for tk in tasks:
            rec.run_started(RunRecord(tk.name, "search_trial", t, tk.info))
        rec.event(f"phase {t}: searching the retraining schedule over {', '.join(searched)}: {len(tasks)} trials, "
                  f"{sp.scheduler}, {sp.metric}", phase=t)
        last: dict[str, dict[str, float]] = {}

        def on_epoch(name: str, row: dict[str, float]) -> None:
            last[name] = row
            rec.metric(name, row)

        ends = self.executor.search(tasks, on_epoch, metric=sp.metric, mode=sp.mode, scheduler=sp.scheduler,
                                    grace_period=sp.grace_period, reduction_factor=sp.reduction_factor)
        score = {tk.name: last.get(tk.name, {}).get(sp.metric) for tk in tasks}
        ok = [i for i, tk in enumerate(tasks) if not isinstance(ends.get(tk.name), BaseException)
              and score[tk.name] is not None and math.isfinite(score[tk.name])]
        best = (max if sp.mode == "max" else min)(ok, key=lambda i: score[tasks[i].name]) if ok else None
        compute = Compute()
        for tk in tasks:
            row = last.get(tk.name, {})
            compute.add(row.get("cpu_seconds"), row.get("gpu_seconds"), row.get("epoch"))
        for i, tk in enumerate(tasks):
            end = ends.get(tk.name, RuntimeError("the search reported no end for this trial"))
            row = {k: v for k, v in last.get(tk.name, {}).items() if k not in ("step", "lr")}
            metrics = dict(row, epochs_run=int(row.pop("epoch", 0)), stopped_early=end == "stopped", chosen=i == best)
            if isinstance(end, BaseException):
                rec.run_finished(tk.name, "failed", metrics=metrics, error=repr(end))
            else:
                rec.run_finished(tk.name, "succeeded", metrics=metrics)
        if best is None:
            rec.event(f"phase {t}: every search trial failed; the ingredients use the spec's config", level="error",
                      phase=t)
            return default, compute
        stopped = sum(1 for e in ends.values() if e == "stopped")
        base_score = score[tasks[0].name]
        rec.event(f"phase {t}: {configs[best].describe()} chosen, {sp.metric} {score[tasks[best].name]:.4f} vs "
                  + (f"{base_score:.4f} default" if base_score is not None else "no score for the default")
                  + f" ({stopped} of {len(tasks)} trials stopped early)", phase=t)
        return configs[best], compute


    # -- phases 1..T
    def _phase(self, ctx: _Context, t: int, parent_rec: ModelRecord, rate: float) -> tuple[ModelRecord, PhaseSummary]:
        spec, rec = self.spec, self.recorder
        target = sparsity_after(rate, t) if t < spec.prune.phases else spec.prune.target_sparsity
        rec.phase_started(t, target)
        timing: dict[str, float] = {}
        t0, cpu0 = time.perf_counter(), time.process_time()
        compute, in_process = Compute(), Compute()

        # prune (pruning is deterministic; a resumed phase reuses the pruned model it saved)
        resume = self.resume if self.resume and len(self.resume.phases) == t else None
        if resume and resume.pruned:
            pruned_rec = resume.pruned
            norm_drop = pruned_rec.metrics["norm_drop"]
            pruned_scores = {k: v for k, v in pruned_rec.metrics.items() if k.startswith(("val_", "test_"))}
        else:
            meta = self._meta(ctx, uuid.uuid4().hex, "pruned", t, f"phase{t}/pruned", [(parent_rec.id, "pruned_from")])
            pr = self._step(Prune(name=f"phase{t}/prune", task=ctx.task, parent=parent_rec.uri,
                                  url=self._url(f"phase{t}/pruned"), meta=meta, target=target, scope=spec.prune.scope,
                                  criterion=spec.prune.criterion, seed=prune_seed(spec, t), pattern=spec.prune.pattern),
                            compute, in_process)
            norm_drop, pruned_scores = pr.norm_drop, pr.scores
            pruned_rec = self._record(pr.saved, meta, dict(pruned_scores, norm_drop=norm_drop, removed=pr.removed,
                                                           **({"structure": pr.structure} if pr.structure else {})))
            if pr.structure:
                rec.event(f"phase {t}: pruned (target {100 * target:.1f}% of the channels): {structure_line(pr.structure)}; "
                          f"{100 * pruned_rec.sparsity:.1f}% of the weights zero, {ctx.metric.name} after pruning "
                          f"{_num(ctx.test(pruned_scores))}", phase=t)
            else:
                rec.event(f"phase {t}: pruned to sparsity {pruned_rec.sparsity:.4f} (target {target:.4f}), "
                          f"{ctx.metric.name} after pruning {_num(ctx.test(pruned_scores))}", phase=t)
            for note in pr.notes:
                rec.event(f"phase {t}: {note}", phase=t)
        timing["prune"] = time.perf_counter() - t0

        start = PhaseStart(phase=t, url=pruned_rec.uri, rate=rate, norm_drop=norm_drop, dense_lrs=ctx.dense_lrs,
                           dense_epochs=ctx.dense_epochs, steps_per_epoch=ctx.info.steps_per_epoch)

        def make_task(name: str, config: RetrainConfig, info: dict[str, Any], ingredient: bool = False) -> TrainTask:
            """A retraining task; an ingredient's worker also recalibrates, scores and saves it."""
            if not ingredient:
                return retrain_task(spec, start, name, config, info)
            finish = Finish(url=self._url(name), recal_fraction=spec.soup.bn_recalibration_fraction,
                            probs_url=self._probs_url(name),
                            meta=self._meta(ctx, uuid.uuid4().hex, "ingredient", t, name,
                                            [(pruned_rec.id, "retrained_from")]))
            return retrain_task(spec, start, name, config, info, finish=finish,
                                resume_url=self.artifacts.uri(f"{self.prefix}{name}.epoch.safetensors")
                                if self.epoch_checkpoints else None)

        # search the retraining schedule (a finished search of a resumed phase is not run again)
        base = None
        if spec.search is not None and spec.search.applies(t):
            t_search = time.perf_counter()
            if resume and resume.searched:
                base = RetrainConfig(**resume.searched)
            else:
                base, trials = self._search(ctx, t, make_task)
                compute.add(trials.cpu_seconds, trials.gpu_seconds, trials.epochs_trained)
                if self.executor.in_process:
                    in_process.add(trials.cpu_seconds)
            timing["search"] = time.perf_counter() - t_search

        # retrain the ingredients; each worker recalibrates BatchNorm, scores and saves its ingredient
        t1 = time.perf_counter()
        tasks = [make_task(f"phase{t}/ingredient{i}", s, {"index": i, "vary": spec.soup.vary}, ingredient=True)
                 for i, s in enumerate(ingredient_settings(spec, t, ctx.eta_max, base))]
        reused = resume.ingredients if resume else {}
        todo = [task for task in tasks if task.name not in reused]
        if reused:
            rec.event(f"phase {t}: resuming; reusing the finished ingredients {sorted(reused)}", phase=t)
        for task in todo:
            rec.run_started(RunRecord(task.name, "ingredient", t, task.info))
        # each ingredient is recorded as soon as it finishes, so a driver that dies mid-phase leaves the
        # finished ones for its successor to reuse
        done: dict[str, ModelRecord | None] = {}

        def finished(task: TrainTask, out: Any) -> None:
            if task.resume_url:
                self.artifacts.delete(task.resume_url)
            if isinstance(out, BaseException):
                rec.run_finished(task.name, "failed", error=repr(out))
                rec.event(f"phase {t}: {task.name.split('/')[-1]} failed: {out}{_hint(spec, out, dense=False)}",
                          level="error", phase=t)
                done[task.name] = None
                return
            metrics = run_metrics(out)
            irec = self._record(out.saved, task.finish.meta, metrics)
            rec.run_finished(task.name, "succeeded", model_id=irec.id,
                             metrics=dict(metrics, resumed_from_epoch=out.resumed_from_epoch))
            done[task.name] = irec
            compute.add_outcome(out)
            if self.executor.in_process:
                in_process.add_outcome(out)

        for name, irec in reused.items():
            done[name] = irec
            m = irec.metrics                       # spent by the driver that trained it
            compute.add(m.get("cpu_seconds"), m.get("gpu_seconds"), m.get("epochs_trained"))
        self.executor.run(todo, rec.metric, finished)
        timing["retrain"] = time.perf_counter() - t1
        survivors = [(i, task.name, r) for i, task in enumerate(tasks) if (r := done[task.name]) is not None]
        accs = [None if done[task.name] is None else ctx.test(done[task.name].metrics) for task in tasks]
        if len(survivors) < spec.soup.min_ingredients:
            msg = (f"phase {t}: only {len(survivors)} of {len(tasks)} ingredients finished, "
                   f"fewer than min_ingredients={spec.soup.min_ingredients}; the phase fails")
            rec.event(msg, level="error", phase=t)
            raise PhaseFailed(msg)
        if len(survivors) < len(tasks):
            rec.event(f"phase {t}: soup made from the {len(survivors)} surviving ingredients "
                      f"{[i for i, *_ in survivors]} of {len(tasks)}", level="warning", phase=t)

        # soup: average, recalibrate BatchNorm, evaluate (the ingredients were scored the same way), on a worker
        metric = ctx.metric
        meta = self._meta(ctx, uuid.uuid4().hex, "soup", t, f"phase{t}/soup", [])
        sp = self._step(Soup(name=f"phase{t}/soup", task=ctx.task, pruned=pruned_rec.uri,
                             ingredients=[r.uri for *_, r in survivors], ingredient_ids=[r.id for *_, r in survivors],
                             val_scores=[r.metrics.get(ctx.key("val_{m}")) for *_, r in survivors],
                             probs=[self._probs_url(name) for _, name, _ in survivors], method=spec.soup.method,
                             recal_fraction=spec.soup.bn_recalibration_fraction, higher_is_better=metric.mode == "max",
                             url=self._url(f"phase{t}/soup"), meta=meta), compute, in_process)
        timing.update(sp.timing)
        chosen = [survivors[j][0] for j in sp.chosen]
        chosen_recs = [survivors[j][2] for j in sp.chosen]
        meta["parents"] = [{"id": r.id, "kind": "averaged_from"} for r in chosen_recs]
        if spec.soup.method == "greedy":
            rec.event(f"phase {t}: greedy soup of ingredients {chosen} (val {metric.name} {sp.greedy_score:.4f}, "
                      f"best ingredient {metric.best(sp.ingredient_scores):.4f})", phase=t)
        soup_scores, ensemble = sp.scores, sp.ensemble
        ok = [a for a in accs if a is not None]
        soup_score = ctx.test(soup_scores)
        mean = statistics.fmean(ok)
        extra = phase_metrics(metric, {
            "gain_over_best": metric.gain(soup_score, metric.best(ok)), "gain_over_mean": metric.gain(soup_score, mean),
            "ensemble_{m}": ensemble, "mean_pairwise_distance": statistics.fmean(sp.distances) if sp.distances else 0.0})
        if sp.structure:
            extra.update(phase_metrics(metric, {"channels_removed": sp.structure["channels_removed"],
                                                "macs_share": sp.structure["macs"] / max(sp.structure["dense_macs"], 1)}))
        soup_rec = self._record(sp.saved, meta, dict(soup_scores, **extra, ingredients=chosen,
                                                     **({"structure": sp.structure} if sp.structure else {})))
        self._driver_share(compute, cpu0, in_process, timing)
        timing["total"] = time.perf_counter() - t0
        summary = PhaseSummary(phase=t, target_sparsity=target, sparsity=soup_rec.sparsity, model_id=soup_rec.id,
                               soup_ingredients=chosen, seconds=timing,
                               metrics={**phase_metrics(metric, {
                                   "pruned_{m}": ctx.test(pruned_scores), "ingredient_{ms}": accs, "soup_{m}": soup_score,
                                   "soup_val_{m}": soup_scores.get(ctx.key("val_{m}")),
                                   "soup_loss": soup_scores.get("test_loss")}),
                                   **extra, **phase_metrics(metric, {"norm_drop": norm_drop, **compute.as_metrics()})})
        kept = ""
        if ensemble is not None and metric.gain(ensemble, mean) > 0:
            kept = f", keeping {100 * metric.gain(soup_score, mean) / metric.gain(ensemble, mean):.0f}% of its gain"
        rec.event(f"phase {t}: soup {metric.name} {soup_score:.4f} ({extra['gain_over_best']:+.4f} over the best "
                  f"ingredient, {extra['gain_over_mean']:+.4f} over the mean), sparsity {soup_rec.sparsity:.4f}"
                  + (f"; prediction ensemble of {len(survivors)}: {ensemble:.4f}{kept}" if ensemble is not None else ""),
                  phase=t)
        rec.phase_finished(summary)
        for _, name, _ in survivors:              # measured: the ensemble is a phase metric now
            self.artifacts.delete(self._probs_url(name))
        return soup_rec, summary

    def context(self) -> _Context:
        """What the job needs to know before it starts, asked of a worker (workers.units.Describe): the
        task's metric, steps per epoch and rebuild metadata, and a given checkpoint's dense LR history."""
        spec = self.spec
        compute, in_process = Compute(), Compute()
        info = self._step(Describe(name="describe", task=self.task, checkpoint=spec.model.checkpoint,
                                   max_checkpoint_bytes=getattr(self.artifacts, "max_checkpoint_bytes", None),
                                   ingredients=spec.soup.ingredients), compute, in_process)
        assert isinstance(info, TaskInfo)
        reserve = getattr(self.executor, "reserve_memory", None)
        if info.memory_bytes and reserve is not None:
            reserve(info.memory_bytes)
        spe = info.steps_per_epoch
        history = {"kind": spec.dense.schedule, "lr": spec.dense.lr, "epochs": spec.dense.epochs,
                   "steps_per_epoch": spe, "warmup": spec.dense.warmup}
        dense_lrs, dense_epochs = dense_history(history)
        source = None
        stored_meta = info.checkpoint_meta or CheckpointMeta()
        if spec.model.checkpoint:
            stored = stored_meta.dense_schedule
            own = (f"the spec's dense section ({spec.dense.schedule}, lr {spec.dense.lr:g}, "
                   f"{spec.dense.epochs} epochs)")
            if stored is None:
                source = f"model.checkpoint carries no dense LR history; the retraining schedules use {own}"
            else:
                try:
                    dense_lrs, dense_epochs = dense_history(stored)
                    history = stored
                    source = (f"the retraining schedules use the dense LR history stored in model.checkpoint "
                              f"({len(dense_lrs)} steps over {dense_epochs} epochs, peak {max(dense_lrs):.4g}, "
                              f"final {dense_lrs[-1]:.4g})")
                except (KeyError, TypeError, ValueError) as e:
                    source = (f"model.checkpoint's dense LR history is unreadable ({e!r}); the retraining "
                              f"schedules use {own}")
        if spec.model.checkpoint:
            optimizer = stored_meta.dense_optimizer
            if optimizer is not None and not (isinstance(optimizer, dict) and isinstance(optimizer.get("name"), str)):
                optimizer = None
                note = "model.checkpoint's dense_optimizer is unreadable (not an object with a name); it is ignored"
                source = f"{source}; {note}" if source else note
        else:
            optimizer = None if info.pretrained else dense_optimizer(spec)
        eta_max = retrain_peak_lr(spec, dense_lrs, optimizer)
        if optimizer and optimizer.get("name") == "sfw" and spec.retrain.lr is None:
            note = (f"the dense model was trained with SFW ({optimizer.get('constraint')}): its step size is no "
                    f"SGD learning rate, so retraining peaks at lr {eta_max:g} (set retrain.lr to choose)")
            source = f"{source}; {note}" if source else note
        meta = dict(info.meta, job=spec.name, spec=spec.model_dump(mode="json"), dense_schedule=history)
        if optimizer is not None:
            meta["dense_optimizer"] = optimizer
        return _Context(task=self.task, info=info, metric=METRICS[info.metric], dense_lrs=dense_lrs,
                        dense_epochs=dense_epochs, meta=meta, dense_source=source, eta_max=eta_max)

    def run(self) -> JobResult:
        spec = self.spec
        ctx = self.context()
        self.recorder.job_started(spec, total_epochs(spec))
        if ctx.dense_source:
            self.recorder.event(ctx.dense_source, phase=0)
        if ctx.info.memory_bytes and hasattr(self.executor, "reserve_memory"):
            self.recorder.event(f"each worker asks the cluster for {ctx.info.memory_bytes / 2**30:.1f} GiB of memory "
                                "(estimated from the model's size and the batch), so that workers queue for memory "
                                "rather than run out of it")
        rate = per_phase_rate(spec.prune.target_sparsity, spec.prune.phases)
        if self.resume:
            summaries, rec = list(self.resume.phases), self.resume.parent
            self.recorder.event(f"resuming after phase {len(summaries) - 1} from model {rec.id}")
        else:
            rec, summary = self._dense(ctx)
            summaries = [summary]
            self.recorder.event(f"pruning {spec.prune.phases} phases at rate p={rate:.4f} per phase "
                                f"to sparsity {spec.prune.target_sparsity}")
        for t in range(len(summaries), spec.prune.phases + 1):
            rec, summary = self._phase(ctx, t, rec, rate)
            summaries.append(summary)
        return JobResult(phases=summaries, final_model_id=rec.id)
