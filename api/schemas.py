"""Response schemas, one set per resource (names clients rely on: design section 4)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from service.states import TERMINAL, JobStatus

EdgeKind = Literal["pruned_from", "retrained_from", "averaged_from"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobPublic(_Out):
    id: str
    name: str
    status: JobStatus
    progress: float
    current_phase: int | None
    final_model_id: str | None
    error: str | None
    owner: str | None
    attempts: int = Field(description="drivers started for the job")
    driver_failures: int = Field(description="drivers that ended without finishing (at most 3 before it fails)")
    sparsity: float | None = Field(description="sparsity reached by the last finished phase")
    best_accuracy: float | None = Field(description="best test accuracy among the last finished phase's models "
                                                    "(its soup and ingredients; the dense model in phase 0)")
    cpu_seconds: float | None = Field(description="CPU-seconds of the finished phases: their runs and the driver")
    gpu_seconds: float | None = Field(description="GPU-seconds of the finished phases (wall time x GPU share)")
    epochs_trained: int | None = Field(description="epochs trained by the finished phases' runs")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]

    @computed_field(description="whether the job has ended (succeeded, failed or cancelled): it will not change")
    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @computed_field(description="seconds from start to finish (to now while it runs)")
    @property
    def wall_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or datetime.now(timezone.utc)
        return max(0.0, (end - self.started_at).total_seconds())


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class PhasePublic(_Out):
    index: int
    status: str
    target_sparsity: float
    sparsity: float | None
    pruned_model_id: str | None
    model_id: str | None
    pruned_accuracy: float | None
    ingredient_accuracies: list[float | None]
    soup_accuracy: float | None
    soup_val_accuracy: float | None
    gain_over_best: float | None
    gain_over_mean: float | None
    norm_drop: float | None
    mean_pairwise_distance: float | None
    soup_ingredients: list[int]
    seconds: dict[str, float | None]
    ensemble_accuracy: float | None = Field(description="test accuracy of the ingredients' prediction ensemble "
                                                        "(argmax of their mean softmax)")
    cpu_seconds: float | None
    gpu_seconds: float | None
    epochs_trained: int | None
    started_at: datetime
    finished_at: datetime | None


class PhasesPublic(BaseModel):
    data: list[PhasePublic]
    count: int


class RunPublic(_Out):
    name: str
    kind: str
    phase: int
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    model_id: str | None
    error: str | None
    attempts: int
    started_at: datetime
    finished_at: datetime | None


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int


class RetrainConfigPublic(BaseModel):
    schedule: str
    lr: float
    epochs: int
    weight_decay: float
    seed: int = 0


class SearchTrialPublic(BaseModel):
    """One trial of a phase's schedule search (service.records.SearchTrial)."""
    model_config = ConfigDict(from_attributes=True)
    phase: int
    index: int
    name: str
    status: str
    config: RetrainConfigPublic
    searched: dict[str, float | int | str] = Field(description="the values the search drew for this trial")
    default: bool = Field(description="trial 0: the spec's own retraining config")
    epochs_run: int | None
    val_accuracy: float | None
    val_loss: float | None
    stopped_early: bool = Field(description="stopped by ASHA at one of its rungs")
    chosen: bool = Field(description="the best by the search's metric: the phase's ingredients use its config")


class SearchTrialsPublic(BaseModel):
    data: list[SearchTrialPublic]
    count: int


class MetricPublic(BaseModel):
    run: str
    step: int
    epoch: int
    name: str
    value: float
    time: datetime


class MetricsPublic(BaseModel):
    data: list[MetricPublic]
    count: int


class EventPublic(_Out):
    id: int
    time: datetime
    level: str
    phase: int | None
    message: str


class EventsPublic(BaseModel):
    data: list[EventPublic]
    count: int


class ModelPublic(_Out):
    id: str
    job_id: str
    kind: Literal["dense", "pruned", "ingredient", "soup"]
    name: str
    phase: int
    sparsity: float
    nonzeros: int
    size_bytes: int
    sha256: str
    accuracy: float | None = None
    metrics: dict[str, Any]
    created_at: datetime


class EdgePublic(BaseModel):
    parent: str
    child: str
    kind: EdgeKind


class LineagePublic(BaseModel):
    nodes: list[ModelPublic]
    edges: list[EdgePublic]


class HealthPublic(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok"]
    ray: str          # "ok", "not dispatching" (an API-only replica), or why Ray's Jobs API does not answer


class ClusterPublic(BaseModel):
    address: str
    nodes: list[dict[str, Any]]
    resources_total: dict[str, float]
    resources_available: dict[str, float]
    jobs: dict[str, int]


class MePublic(BaseModel):
    auth: bool = Field(description="whether the server asks for bearer tokens")
    authenticated: bool = Field(description="whether the request's token is good (true when auth is off)")
    name: str | None
    admin: bool


class Message(BaseModel):
    detail: str
