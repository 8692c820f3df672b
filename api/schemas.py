"""Response schemas, one set per resource (names clients rely on: design section 4)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from service.records import Metric, RunInfo, primary_metric
from service.states import TERMINAL, JobStatus
from service.store.tokens import parse_duration

EdgeKind = Literal["pruned_from", "retrained_from", "averaged_from"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class MetricInfo(BaseModel):
    name: Literal["accuracy", "perplexity"]
    mode: Literal["max", "min"] = Field(description="max: higher is better; min: lower is better")
    percent: bool = Field(description="shown as a percentage")

    @classmethod
    def of(cls, metric: Metric) -> MetricInfo:
        """One instance per metric (a list shows the same one for every job; never changed once made)."""
        info = _METRIC_INFOS.get(metric)
        if info is None:
            info = _METRIC_INFOS[metric] = cls(name=metric.name, mode=metric.mode, percent=metric.percent)
        return info


_METRIC_INFOS: dict[Metric, MetricInfo] = {}


class PhaseColumnPublic(BaseModel):
    """A phase metric (service.records.PHASE_COLUMNS): its key in a phase, how to show it."""
    model_config = ConfigDict(from_attributes=True)
    key: str
    label: str
    unit: Literal["metric", "metrics", "gain", "number", "seconds", "count"]
    description: str
    table: bool = Field(description="a column of the phase tables")
    template: str = Field(description="the key before it is named for the job's metric (`soup_{m}`, "
                                      "`ingredient_{ms}`): how a client finds a column whatever the metric")


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
    best_score: float | None = Field(description="best test score (the job's primary metric) among the last finished "
                                                 "phase's models (its soup and ingredients; the dense model in phase 0)")
    cpu_seconds: float | None = Field(description="CPU-seconds of the finished phases: their runs and the driver")
    gpu_seconds: float | None = Field(description="GPU-seconds of the finished phases (wall time x GPU share)")
    epochs_trained: int | None = Field(description="epochs trained by the finished phases' runs")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any] | None = Field(description="the job's spec; in lists (GET /jobs) only with include_spec=true")
    metric: MetricInfo = Field(description="the primary metric the job's phases are scored by, and which way is better")
    phases_total: int | None = Field(description="the prune–retrain phases the job runs (spec.prune.phases; "
                                                  "phase 0, the dense model, comes before them)")

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, value: Any) -> Any:
        """metric and phases_total come from the spec (the store keeps no columns for them), so that a
        job shown without its spec still has them. A dict that has them already (see `listed`) is taken as
        it is."""
        if isinstance(value, dict) and "metric" in value and "phases_total" in value:
            return value
        value = dict(value) if isinstance(value, dict) else {
            k: getattr(value, k) for k in cls.model_fields if hasattr(value, k)}
        spec = value.get("spec")
        if spec is not None:
            value.setdefault("metric", MetricInfo.of(primary_metric(spec)))
            value.setdefault("phases_total", (spec.get("prune") or {}).get("phases"))
        return value

    @staticmethod
    def listed(row: dict[str, Any]) -> dict[str, Any]:
        """A row of the job list (Store.list_jobs(spec=False): its outline, no spec) as this model's input
        without its spec: metric and phases_total from the outline (service.records.JobOutline)."""
        outline = row.pop("outline")
        return {**row, "spec": None, "metric": MetricInfo.of(outline.metric), "phases_total": outline.phases}

    @computed_field(description="best_score when the job's metric is accuracy (else null)")
    @property
    def best_accuracy(self) -> float | None:
        return self.best_score if self.metric.name == "accuracy" else None

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
    """A phase: its own fields, and its metrics flat beside them (keys: PhasesPublic.columns, such as
    soup_accuracy or soup_perplexity after the job's metric)."""
    model_config = ConfigDict(from_attributes=True, extra="allow")
    index: int
    status: str
    target_sparsity: float
    sparsity: float | None
    pruned_model_id: str | None
    model_id: str | None
    soup_ingredients: list[int]
    seconds: dict[str, float | None]
    started_at: datetime
    finished_at: datetime | None

    @model_validator(mode="wrap")
    @classmethod
    def _flat(cls, value: Any, handler: Any) -> PhasePublic:
        """A phase row's metrics (one JSON column) become fields of their own."""
        if isinstance(value, dict):
            value = dict(value)
            metrics = value.pop("metrics", None)
        else:
            metrics = getattr(value, "metrics", None)
        out = handler(value)
        for k, v in (metrics or {}).items():
            if k not in type(out).model_fields:
                setattr(out, k, v)
        return out


class PhasesPublic(BaseModel):
    data: list[PhasePublic]
    count: int
    metric: MetricInfo
    columns: list[PhaseColumnPublic] = Field(description="the phase metrics, in table order")


class RunPublic(_Out):
    name: str
    kind: str
    phase: int
    status: str
    config: RunInfo
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
    val_perplexity: float | None = Field(None, description="language models")
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
    accuracy: float | None = Field(None, description="test accuracy (image models)")
    perplexity: float | None = Field(None, description="test perplexity (language models)")
    sizes: dict[str, int] = Field(default_factory=dict, description="bytes per export format built so far "
                                  "(dense, sparse, hf, onnx; GET /models/{id}/download?format=)")
    metrics: dict[str, Any]
    created_at: datetime


class EdgePublic(BaseModel):
    parent: str
    child: str
    kind: EdgeKind


class LineagePublic(BaseModel):
    nodes: list[ModelPublic]
    edges: list[EdgePublic]


class RobustnessPoint(BaseModel):
    sparsity: float = Field(description="the sparsity the dense model was pruned to (one-shot, global magnitude)")
    accuracy: float = Field(description="accuracy of the pruned copy after BatchNorm recalibration, no retraining")
    accuracy_raw: float | None = Field(None, description="the same before BatchNorm recalibration (BatchNorm models)")


class RobustnessPublic(BaseModel):
    """A dense model's one-shot robustness curve (workers.robustness), measured in its job's phase 0.
    Not measured (not a dense model, `prune.robustness: null`, a language model, an older job): `points`
    is empty and `detail` says why."""
    model_id: str
    metric: str = "accuracy"
    split: str | None = Field(None, description="the split scored (test; val when the data has no test split)")
    dense_accuracy: float | None = Field(None, description="the dense model's own accuracy on that split")
    points: list[RobustnessPoint]
    detail: str | None = None


class HealthPublic(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok"]
    ray: str          # "ok", "not dispatching" (an API-only replica), or that Ray's Jobs API does not answer


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


class UploadPublic(_Out):
    """A file sent through POST /uploads; specs name it as `ref` (upload:<id>)."""
    id: str
    kind: Literal["checkpoint", "dataset"]
    filename: str
    owner: str | None
    size_bytes: int
    sha256: str
    created_at: datetime

    @computed_field(description="how a job spec names it: model.checkpoint (a checkpoint) or data.path (a dataset)")
    @property
    def ref(self) -> str:
        return f"upload:{self.id}"


class UploadsPublic(BaseModel):
    data: list[UploadPublic]
    count: int


class TokenPublic(_Out):
    """An API token as lists show it: never its secret, only the secret's last four characters."""
    id: str
    name: str = Field(description="whom it is for: the owner of the jobs it submits")
    admin: bool
    created_at: datetime
    expires_at: datetime | None = Field(description="null: never")
    revoked_at: datetime | None
    last4: str | None = Field(description="the secret's last four characters (null for tokens older than them)")

    @computed_field
    @property
    def state(self) -> Literal["active", "revoked", "expired"]:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(timezone.utc):
            return "expired"
        return "active"


class TokensPublic(BaseModel):
    data: list[TokenPublic]
    count: int


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                      description="whom it is for (one token not revoked per name)")
    admin: bool = Field(False, description="sees and cancels every job, and manages tokens")
    expires_in: float | str | None = Field(None, description='lifetime: seconds, or a number and a unit (s, m, h, '
                                           'd, w) such as "30d"; null: until revoked')

    @field_validator("expires_in")
    @classmethod
    def _lifetime(cls, v: float | str | None) -> float | str | None:
        if v is not None:
            parse_duration(v)                       # ValueError: a 422 that names the field
        return v


class TokenCreatedPublic(TokenPublic):
    secret: str = Field(description="the bearer token: shown only in this answer (stored hashed)")
