"""Models and their typed lineage edges. Functions take an open session; the caller owns the
transaction. Lineage reads are one recursive CTE each: `{"nodes": [Model], "edges": [{"parent",
"child", "kind"}]}`."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.orm import Model, ModelEdge, Phase, Run
from service.records import ModelRecord
from service.store.convert import model_rows


def get(s: Session, model_id: str) -> Model | None:
    return s.get(Model, model_id)


def by_name(s: Session, job_id: str, name: str) -> Model | None:
    return s.scalars(sa.select(Model).where(Model.job_id == job_id, Model.name == name)).one_or_none()


def by_uri(s: Session, uri: str, job_id: str | None = None) -> Model | None:
    """The model stored at `uri` (of the job `job_id`, when known: that narrows the search)."""
    q = sa.select(Model).where(Model.uri == uri)
    if job_id is not None:
        q = q.where(Model.job_id == job_id)
    return s.scalars(q.limit(1)).first()


def save(s: Session, job_id: str, record: ModelRecord) -> None:
    """The model and its lineage edges, together. A model of the same name that nothing refers to
    yet (no child, no run or phase result: its driver died right after saving it) is replaced; a
    name in use raises IntegrityError."""
    old = s.scalars(sa.select(Model.id).where(Model.job_id == job_id, Model.name == record.name)).first()
    if old is not None and not s.scalar(sa.select(sa.or_(
            sa.exists().where(ModelEdge.parent_id == old),
            sa.exists().where(Run.job_id == job_id, Run.model_id == old),
            sa.exists().where(Phase.job_id == job_id, Phase.model_id == old)))):
        s.execute(sa.delete(ModelEdge).where(ModelEdge.child_id == old))
        s.execute(sa.delete(Model).where(Model.id == old))
    row, edges = model_rows(job_id, record)
    s.add(row)
    s.flush()
    s.add_all(edges)
    if record.kind == "pruned":               # the phase's pruned model: kept on its phase (a resume reuses it)
        s.execute(sa.update(Phase).where(Phase.job_id == job_id, Phase.index == record.phase)
                  .values(pruned_model_id=record.id))


def add_metrics(s: Session, model_id: str, values: dict[str, Any]) -> Model | None:
    """Merge `values` into the model's metrics (measurements taken after the model was saved: export
    sizes, inference latency, a robustness curve). Keys present are replaced, others kept. None for
    an unknown id."""
    row = s.get(Model, model_id, with_for_update=True)
    if row is None:
        return None
    row.metrics = {**(row.metrics or {}), **values}      # a new dict: the JSON column sees the change
    return row


def graph(s: Session, model_id: str, *, up: bool) -> dict[str, Any]:
    """The model and all its ancestors (up) or descendants, with the edges among them. An unknown
    id gives no nodes."""
    near, far = (ModelEdge.child_id, ModelEdge.parent_id) if up else (ModelEdge.parent_id, ModelEdge.child_id)
    reach = sa.select(Model.id.label("id")).where(Model.id == model_id).cte("reach", recursive=True)
    reach = reach.union(sa.select(far).join(reach, near == reach.c.id))
    ids = sa.select(reach.c.id)
    nodes = list(s.scalars(sa.select(Model).where(Model.id.in_(ids)).order_by(Model.phase, Model.created_at)))
    edges = s.scalars(sa.select(ModelEdge).where(near.in_(ids), far.in_(ids))
                      .order_by(ModelEdge.child_id, ModelEdge.parent_id)).all()
    return {"nodes": nodes, "edges": [{"parent": e.parent_id, "child": e.child_id, "kind": e.kind} for e in edges]}
