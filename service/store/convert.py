"""Rows to records and back: the one place that knows both shapes (service.orm and service.records).
Phase columns are the fields of PhaseSummary (records.PHASE_FIELDS); its metrics are one JSON column."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from service.orm import Model, ModelEdge, Phase, Run
from service.records import PHASE_FIELDS, ModelRecord, PhaseSummary, SearchTrial


def finite(x: Any) -> Any:
    """JSON has no NaN/Infinity (PostgreSQL refuses them): None instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def model_record(row: Model, parents: list[tuple[str, str]] | None = None) -> ModelRecord:
    return ModelRecord(id=row.id, kind=row.kind, phase=row.phase, name=row.name, uri=row.uri,
                       size_bytes=row.size_bytes, sha256=row.sha256, sparsity=row.sparsity, nonzeros=row.nonzeros,
                       metrics=dict(row.metrics or {}), parents=list(parents or []))


def model_rows(job_id: str, record: ModelRecord) -> tuple[Model, list[ModelEdge]]:
    """A model's row and its lineage edges."""
    row = Model(id=record.id, job_id=job_id, phase=record.phase, kind=record.kind, name=record.name, uri=record.uri,
                size_bytes=record.size_bytes, sha256=record.sha256, sparsity=record.sparsity,
                nonzeros=record.nonzeros, metrics=finite(record.metrics))
    return row, [ModelEdge(parent_id=p, child_id=record.id, kind=k) for p, k in record.parents]


def phase_summary(row: Phase) -> PhaseSummary:
    values = {f: getattr(row, f) for f in PHASE_FIELDS}
    values["soup_ingredients"] = list(values["soup_ingredients"] or [])
    values["seconds"] = dict(values["seconds"] or {})
    return PhaseSummary(phase=row.index, metrics=dict(row.metrics or {}), **values)


def search_trial(run: Run) -> SearchTrial:
    """A search trial from its run row (kind search_trial)."""
    c, m = run.config, run.metrics or {}
    return SearchTrial(phase=run.phase, index=c.index or 0, name=run.name, status=run.status,
                       config=dict(c.config or {}), searched=dict(c.search or {}),
                       default=bool(c.default), epochs_run=m.get("epochs_run"),
                       val_accuracy=m.get("val_accuracy"), val_loss=m.get("val_loss"),
                       val_perplexity=m.get("val_perplexity"),
                       stopped_early=bool(m.get("stopped_early")), chosen=bool(m.get("chosen")))


def fill_phase(row: Phase, summary: PhaseSummary) -> None:
    """Copy a phase's summary onto its row."""
    data = finite(asdict(summary))
    for f in (*PHASE_FIELDS, "metrics"):
        setattr(row, f, data[f])
