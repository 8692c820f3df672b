"""The phase steps of workers.units, run where the job's resources are (a Ray worker, or the driver's
own process under the sequential executor): each builds the job's task (cached: a worker serves one
job, and loading data or a language model is the expensive part), loads the checkpoints it names,
does its tensor work on the worker's device, saves what it makes and returns small records.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from workers.checkpoint import CheckpointError, from_bytes, load, read_url, save_model, sha256_bytes
from workers.config import ModelError
from workers.pruning import prunable_names
from workers.soup import check_shared_mask, greedy_soup, pairwise_distances, uniform_soup
from workers.tasks import load_cached, load_probs, release_memory
from workers.train import default_device
from workers.units import (Curve, Describe, Export, ExportOut, LoadModel, ModelOut, Prune, PruneOut, Robustness, Soup,
                           SoupOut, Step, StepOut, TaskInfo, TaskSpec)

_TASK: tuple[TaskSpec, Any] | None = None      # the last task this process built, with its spec


def build_task(spec: TaskSpec, device: torch.device | None = None):
    """The job's task (service.records.Task) on `device` (default: CUDA where there is one), from this
    process's cache when the last one built had the same spec."""
    global _TASK
    device = device or default_device()
    if _TASK is not None and _TASK[0] == spec and _TASK[1].device == device:
        return _TASK[1]
    _TASK = None                                # free the old one before loading the next
    release_memory()
    if spec.kind == "causal_lm":
        from workers.lm.task import CausalLM
        task = CausalLM(arch=spec.arch, data=spec.data, seed=spec.seed, device=device,
                        model_kwargs=dict(spec.model_kwargs), structure=spec.structure)
    else:
        from workers.classification import Classification
        task = Classification(arch=spec.arch, data=spec.data, seed=spec.seed, device=device,
                              model_kwargs=dict(spec.model_kwargs), structure=spec.structure)
    _TASK = (spec, task)
    release_memory()                            # what loading left behind (a language model's weights)
    return task


def _curve(task, model, grid: list[float], fraction: float) -> Curve | None:
    if not grid:
        return None
    t0 = time.perf_counter()
    curve = task.robustness(model, grid, fraction)
    if curve is None:
        return Curve()
    return Curve(split=curve["split"], points=curve["points"], seconds=time.perf_counter() - t0)


def describe(step: Describe, task) -> TaskInfo:
    meta = None
    if step.checkpoint:
        meta = load(step.checkpoint, max_bytes=step.max_checkpoint_bytes).info
    return TaskInfo(metric=task.metric, pretrained=task.pretrained, steps_per_epoch=task.steps_per_epoch,
                    meta=task.meta, checkpoint_meta=meta, memory_bytes=task.memory_estimate(step.ingredients))


def load_model(step: LoadModel, task) -> ModelOut:
    if step.source is None:
        model = task.build()
        masks = task.full_masks(model)
    else:
        ckpt = load(step.source, max_bytes=step.max_checkpoint_bytes)
        arch, want = ckpt.info.arch, step.task.arch
        if arch and arch != want:
            raise ModelError(f"model.checkpoint was made for arch {arch!r}, the spec says {want!r}")
        model = task.build(ckpt.state)
        masks = ckpt.masks or task.full_masks(model)
    scores = task.scores(model)
    curve = _curve(task, model, step.grid, step.recal_fraction)
    return ModelOut(saved=save_model(step.url, model, masks, step.meta), scores=scores, curve=curve)


def robustness(step: Robustness, task) -> ModelOut:
    return ModelOut(curve=_curve(task, task.build(load_cached(step.url).state), step.grid, step.recal_fraction))


def prune(step: Prune, task) -> PruneOut:
    parent = load_cached(step.parent)
    model = task.build(parent.state)
    masks = parent.masks or task.full_masks(model)
    r = task.prune(model, masks, step.target, scope=step.scope, criterion=step.criterion, seed=step.seed,
                   pattern=step.pattern)
    scores = task.scores(r.model)
    saved = save_model(step.url, r.model, r.masks, step.meta)
    structure = task.structure_report(r.model, r.masks) if task.structure != "unstructured" else None
    return PruneOut(saved=saved, scores=scores, norm_drop=r.norm_drop, removed=r.removed, notes=list(r.notes),
                    structure=structure)


def soup(step: Soup, task) -> SoupOut:
    """Average, check the shared mask, recalibrate and score (see workers.units.Soup)."""
    t_soup = time.perf_counter()
    masks = load_cached(step.pruned).masks
    states = [load(url).state for url in step.ingredients]
    check_shared_mask(states, masks)
    sign = 1.0 if step.higher_is_better else -1.0      # greedy_soup keeps what scores higher

    def val_score(state) -> float:
        return sign * task.val_score(task.recalibrate(task.build(state), step.recal_fraction))

    out = SoupOut()
    if step.method == "greedy":
        known = [None if v is None else sign * v for v in step.val_scores] if step.val_scores else None
        g = greedy_soup(states, masks, val_score, scores=known)
        state, out.chosen = g.state, list(g.chosen)
        out.greedy_score, out.ingredient_scores = sign * g.score, [sign * s for s in g.ingredient_scores]
    else:
        state, out.chosen = uniform_soup(states, masks), list(range(len(states)))
    model = task.recalibrate(task.build(state), step.recal_fraction)
    if task.structure != "unstructured":
        out.structure = task.structure_report(model, masks)      # every removed group still exactly zero, or an error
    t_eval = time.perf_counter()
    out.timing["soup"] = t_eval - t_soup
    out.scores = task.scores(model)
    names = prunable_names(model)
    out.distances = pairwise_distances(states, names) if len(states) > 1 else []
    del states, state
    if task.ensembles:
        out.ensemble = task.ensemble([_probs(task, url, probs) for url, probs in
                                      zip(step.ingredients, step.probs or [None] * len(step.ingredients))])
    out.timing["eval"] = time.perf_counter() - t_eval
    meta = dict(step.meta, parents=[{"id": step.ingredient_ids[j], "kind": "averaged_from"} for j in out.chosen]
                if step.ingredient_ids else step.meta.get("parents", []))
    out.saved = save_model(step.url, model, masks, meta)
    return out


def _probs(task, url: str, probs_url: str | None):
    """An ingredient's test softmax: saved beside it, or computed from its checkpoint (one at a time)."""
    if probs_url:
        try:
            return load_probs(probs_url)
        except Exception:   # noqa: BLE001 - not there (an older job's ingredient): compute it
            pass
    return task.test_probs(task.build(load(url).state))


RUNNERS: dict[type, Callable[[Any, Any], StepOut]] = {Describe: describe, LoadModel: load_model,
                                                       Robustness: robustness, Prune: prune, Soup: soup}


def run_step(step: Step) -> StepOut:
    """Run `step` in this process on its default device, timed (CPU time of the process, wall time,
    GPU-seconds on CUDA: wall time x the GPU share held)."""
    start, cpu0 = time.perf_counter(), time.process_time()
    if step.threads:
        torch.set_num_threads(step.threads)
    task = build_task(step.task)
    out = RUNNERS[type(step)](step, task)
    release_memory()
    out.seconds = time.perf_counter() - start
    out.cpu_seconds = time.process_time() - cpu0
    out.gpu_seconds = out.seconds * (step.gpus or 1.0) if task.device.type == "cuda" else 0.0
    return out


def run_export(step: Export) -> ExportOut:
    """Build one export of a stored checkpoint in this process, on the CPU (an export is serialisation:
    reading, rebuilding, tracing, writing; no device would make it faster), timed. CheckpointError when
    the checkpoint cannot be read or does not match its record; ExportError, ImportError, ModelError as
    workers.export.export_bytes raises them."""
    from workers.export import export_bytes
    from workers.files import write_url
    from workers.process import peak_rss_bytes
    start, cpu0 = time.perf_counter(), time.process_time()
    if step.threads:
        torch.set_num_threads(step.threads)
    try:
        data = read_url(step.model_uri)
    except OSError as e:
        raise CheckpointError(f"{step.name} cannot be read ({e.strerror or e})") from e
    if len(data) != step.size_bytes or sha256_bytes(data) != step.sha256:
        raise CheckpointError(f"{step.name} does not match the store's size and sha256; nothing was exported from it")
    ckpt = from_bytes(data, source=step.name)
    del data
    out = export_bytes(ckpt, step.fmt)
    del ckpt
    write_url(step.out_uri, out)
    result = ExportOut(size_bytes=len(out), sha256=sha256_bytes(out),
                       peak_rss_bytes=peak_rss_bytes() or 0)
    del out
    release_memory()
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu0
    return result
