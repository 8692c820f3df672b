"""/api/v1/jobs: submit, list, inspect and cancel jobs; their phases, runs, metrics and events.

Reads that touch a bounded number of rows (a job, a page of jobs without their specs, a job's phases
and runs) are `async def` and use the store on the event loop: they take well under a millisecond and
never wait for a lock (SQLite in WAL mode, PostgreSQL MVCC). A submission's parsing, validation and
write run on a worker thread (a write may wait for SQLite's lock or a WAL checkpoint's fsync; a large
body takes milliseconds to parse), and so do cancel (which calls Ray) and reads of unbounded size
(metrics, events). bench/api_load.py measures the result; the figures are in the README.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from api.deps import CallerDep, RuntimeDep, StoreDep, visible
from api.hardening import SafeJSONRoute, read_json
from api.schemas import (EventPublic, EventsPublic, JobPublic, JobsPublic, JobStatus, Message, MetricInfo,
                         MetricPublic, MetricsPublic, PhaseColumnPublic, PhasePublic, PhasesPublic, RunPublic,
                         RunsPublic, SearchTrialPublic, SearchTrialsPublic)
from service.access import Access
from service.cluster import unfit
from service.records import phase_columns, primary_metric
from service.spec import JobSpec, SpecError, parse_spec
from service.states import TERMINAL, StateError
from service.store import QuotaExceeded
from service.store.convert import search_trial

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=SafeJSONRoute)
MAX_ID = 2**63 - 1          # the largest id a BIGINT (and SQLite's INTEGER) holds
NOT_FOUND = {404: {"model": Message, "description": "no such job (or not yours)"}}
SSE_POLL = 0.5              # seconds between an event stream's looks at the store
SSE_KEEPALIVE = 15.0        # an event stream with nothing to say sends a comment this often


def _job(store, caller, job_id: str):
    job = store.get_job(job_id)
    if job is None or not visible(caller, job.owner):
        raise _not_found(job_id)
    return job


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")


# POST /jobs reads its body itself (see submit_job); the schema documents it as a JobSpec
SPEC_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/JobSpec"}}}}}


def spec_schemas() -> dict[str, Any]:
    """JobSpec's JSON schema and those of its parts, for the OpenAPI document's components."""
    schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), "JobSpec": schema}


def _submit(body: bytes, store, runtime, caller, idempotency_key: str | None) -> JobPublic:
    """Parse, validate and store a submitted spec (on a worker thread: none of it runs on the event loop)."""
    value = read_json(body)
    if not isinstance(value, dict):
        raise RequestValidationError([{"loc": ("body",), "msg": "a job spec is a JSON object", "type": "dict_type",
                                       "input": None}])
    access = Access.from_settings(runtime.settings, store=store, owner=caller.name, admin=caller.admin)
    try:
        spec = parse_spec(value, access=access)
    except SpecError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.details]) from None
    nodes = runtime.cached_nodes()
    why = unfit(spec.resources.cpus_per_ingredient, spec.resources.gpus_per_ingredient,
                runtime.nodes() if nodes is ... else nodes)          # the cluster, read at most every 30 s
    if why is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            [{"loc": ["body", "resources"], "msg": why, "type": "value_error"}])
    settings = runtime.settings
    if spec.timeout is None and settings.default_job_timeout is not None:
        spec = spec.model_copy(update={"timeout": settings.default_job_timeout})
    try:
        job = store.create_job(spec, owner=caller.name, idempotency_key=idempotency_key,
                               max_open=None if caller.admin else settings.max_open_jobs_per_user)
    except QuotaExceeded as e:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(e)) from None
    return JobPublic.model_validate(job)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic, openapi_extra=SPEC_BODY,
             responses={413: {"model": Message, "description": "the body is over LADLE_MAX_BODY_BYTES"},
                        429: {"model": Message, "description": "the caller has LADLE_MAX_OPEN_JOBS_PER_USER jobs "
                                                               "queued or running"}})
async def submit_job(request: Request, store: StoreDep, runtime: RuntimeDep, caller: CallerDep,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobPublic:
    """Validate and queue a job (the body: a JobSpec). The same `Idempotency-Key` again returns the same
    job. A job whose ingredients ask for more CPUs or GPUs than any node of the cluster has is refused
    (422), and so is a spec that names code, files or models it may not: `import:` modules the operator
    has not allowed, paths outside the data roots, URLs, other users' models (`model.checkpoint:
    model:<id>` names your own). The body (at most LADLE_MAX_BODY_BYTES) is parsed, validated and
    stored on a worker thread, so a large or slow one stalls no other request."""
    body = await request.body()
    return await asyncio.to_thread(_submit, body, store, runtime, caller, idempotency_key)


@router.get("", response_model=JobsPublic)
async def list_jobs(store: StoreDep, caller: CallerDep, status_: Annotated[JobStatus | None, Query(alias="status")] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
              include_spec: Annotated[bool, Query(description="each job's spec too (else null)")] = False) -> JobsPublic:
    """A page of jobs, newest first. Their specs only with include_spec=true (GET /jobs/{id} has it);
    each job's `metric` and `phases_total` come either way."""
    owner = None if caller.admin else caller.name
    rows, count = store.list_jobs(status=status_, owner=owner, limit=limit, offset=offset, spec=include_spec)
    if include_spec:
        return JobsPublic(data=[JobPublic.model_validate(r) for r in rows], count=count)
    return JobsPublic(data=[JobPublic.listed(r) for r in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
async def get_job(job_id: str, store: StoreDep, caller: CallerDep) -> JobPublic:
    # the job as a plain row (Store.job_row), not an ORM object: the hottest read of the API
    job = store.job_row(job_id)
    if job is None or not visible(caller, job["owner"]):
        raise _not_found(job_id)
    return JobPublic.model_validate(job)


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={**NOT_FOUND, 409: {"model": Message, "description": "the job has already ended"}})
def cancel_job(job_id: str, store: StoreDep, runtime: RuntimeDep, caller: CallerDep) -> JobPublic:
    job = _job(store, caller, job_id)
    if job.status in TERMINAL:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is already {job.status}")
    try:
        runtime.cancel(job_id)
    except StateError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    return JobPublic.model_validate(store.get_job(job_id))


@router.get("/{job_id}/phases", response_model=PhasesPublic, responses=NOT_FOUND)
async def job_phases(job_id: str, store: StoreDep, caller: CallerDep) -> PhasesPublic:
    """The job's phases, with their metrics named after the job's primary metric (listed in `columns`)."""
    metric = primary_metric(_job(store, caller, job_id).spec)
    rows = [PhasePublic.model_validate(p) for p in store.phases(job_id)]
    return PhasesPublic(data=rows, count=len(rows), metric=MetricInfo.of(metric),
                        columns=[PhaseColumnPublic.model_validate(c) for c in phase_columns(metric)])


@router.get("/{job_id}/runs", response_model=RunsPublic, responses=NOT_FOUND)
async def job_runs(job_id: str, store: StoreDep, caller: CallerDep, kind: str | None = None) -> RunsPublic:
    _job(store, caller, job_id)
    rows = [RunPublic.model_validate(r) for r in store.runs(job_id, kind=kind)]
    return RunsPublic(data=rows, count=len(rows))


@router.get("/{job_id}/search", response_model=SearchTrialsPublic, responses=NOT_FOUND)
async def job_search(job_id: str, store: StoreDep, caller: CallerDep) -> SearchTrialsPublic:
    """The schedule-search trials of every searched phase, by phase and trial."""
    _job(store, caller, job_id)
    rows = [SearchTrialPublic.model_validate(search_trial(r)) for r in store.runs(job_id, kind="search_trial")]
    rows.sort(key=lambda r: (r.phase, r.index))
    return SearchTrialsPublic(data=rows, count=len(rows))


@router.get("/{job_id}/metrics", response_model=MetricsPublic, responses=NOT_FOUND)
def job_metrics(job_id: str, store: StoreDep, caller: CallerDep, run: str | None = None, name: str | None = None,
                limit: Annotated[int, Query(ge=1, le=100_000)] = 100_000) -> MetricsPublic:
    _job(store, caller, job_id)
    rows = [MetricPublic(**m) for m in store.metrics(job_id, run_name=run, name=name, limit=limit)]
    return MetricsPublic(data=rows, count=len(rows))


@router.get("/{job_id}/events", response_model=EventsPublic, responses=NOT_FOUND)
def job_events(job_id: str, store: StoreDep, caller: CallerDep, after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> EventsPublic:
    """The job's events after the id `after`."""
    _job(store, caller, job_id)
    rows = [EventPublic.model_validate(e) for e in store.events(job_id, after_id=after, limit=limit)]
    return EventsPublic(data=rows, count=len(rows))


@router.get("/{job_id}/events/stream", responses={
    **NOT_FOUND, 200: {"content": {"text/event-stream": {}}},
    429: {"model": Message, "description": "the caller has as many event streams open as it may"}})
async def job_event_stream(job_id: str, request: Request, store: StoreDep, runtime: RuntimeDep, caller: CallerDep,
                           after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                           last_event_id: Annotated[int | None, Header(ge=0, le=MAX_ID)] = None) -> StreamingResponse:
    """Server-sent events: `event: event` (with its id) for each new event after `after` (or the
    `Last-Event-ID` a reconnecting client sends), `event: job` when the job changes (status, progress,
    phase), `event: end` after the job ends, and then the stream ends. A stream also ends after
    LADLE_SSE_MAX_SECONDS without `event: end` (the client reconnects, with Last-Event-ID); a user may
    hold LADLE_SSE_STREAMS_PER_USER streams at once (429 beyond)."""
    _job(store, caller, job_id)
    settings = runtime.settings
    start = max(after, last_event_id or 0)
    deadline = asyncio.get_running_loop().time() + settings.sse_max_seconds

    async def stream():
        loop = asyncio.get_running_loop()
        last, seen, said = start, None, loop.time()
        while not await request.is_disconnected():
            events = await asyncio.to_thread(store.events, job_id, after_id=last)
            for e in events:
                last = e.id
                yield f"id: {e.id}\nevent: event\ndata: {EventPublic.model_validate(e).model_dump_json()}\n\n"
            job = await asyncio.to_thread(store.get_job, job_id)
            state = (job.status, round(job.progress, 4), job.current_phase)
            changed = state != seen
            if changed:
                seen = state
                yield f"event: job\ndata: {JobPublic.model_validate(job).model_dump_json()}\n\n"
            if job.status in TERMINAL and not events:
                yield f"event: end\ndata: {json.dumps({'status': job.status})}\n\n"
                return
            now = loop.time()
            if now >= deadline:
                yield ": this stream's time is up: reconnect, with Last-Event-ID, for more\n\n"
                return
            if events or changed:
                said = now
            elif now - said >= SSE_KEEPALIVE:      # idle proxies keep the connection; a gone client shows
                yield ": keep-alive\n\n"
                said = now
            await asyncio.sleep(min(SSE_POLL, deadline - now))

    response = request.app.state.streams.open(caller.name, settings.sse_streams_per_user, stream(),
                                              media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    if response is None:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"too many open event streams: at most {settings.sse_streams_per_user} per user; "
                            "close one, or poll GET /jobs/{id}/events", headers={"Retry-After": "10"})
    return response
