"""/api/v1/health (liveness and a DB check; public, so it names no address and no raw error) and
/api/v1/cluster (Ray nodes, their addresses and resources, the Jobs API's address: admins only)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from api.deps import AdminDep, RuntimeDep, StoreDep
from api.hardening import SafeJSONRoute
from api.schemas import ClusterPublic, HealthPublic, Message

router = APIRouter(tags=["health"], route_class=SafeJSONRoute)


@router.get("/health", response_model=HealthPublic, responses={503: {"description": "the database does not answer"}})
def health(store: StoreDep, runtime: RuntimeDep) -> HealthPublic:
    """200 while the database answers. `ray` says whether the dispatcher reaches Ray's Jobs API; while
    it does not, `status` is `degraded`: jobs are accepted and wait in the queue. Public: why Ray does
    not answer, and where it is, is for admins (GET /cluster)."""
    try:
        store.ping()
    except Exception as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"database: {type(e).__name__}") from None
    state = runtime.status()
    ray_error = state["ray_error"] if state["dispatching"] else None
    if not state["dispatching"]:
        ray = "not dispatching"
    else:
        ray = "ok" if ray_error is None else "Ray's Jobs API does not answer (details: GET /api/v1/cluster, admins)"
    return HealthPublic(status="ok" if ray_error is None else "degraded", database="ok", ray=ray)


@router.get("/cluster", response_model=ClusterPublic,
            responses={403: {"model": Message, "description": "not an admin token"},
                       503: {"description": "Ray does not answer"}})
def cluster(runtime: RuntimeDep, store: StoreDep, _: AdminDep) -> ClusterPublic:
    """Ray's nodes (with their addresses), resources in use, and the running and queued jobs: admins only."""
    from ray.util.state import list_actors, list_nodes
    try:
        nodes = list_nodes(address=runtime.jobs_api_url, timeout=10)
        actors = list_actors(address=runtime.jobs_api_url, filters=[("state", "=", "ALIVE")], detail=True,
                             timeout=10, raise_on_missing_output=False)
    except Exception as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray at {runtime.jobs_api_url}: {e}") from None
    total: dict[str, float] = {}
    for n in nodes:
        if n.state == "ALIVE":
            for k, v in (n.resources_total or {}).items():
                if not k.startswith("node:"):
                    total[k] = total.get(k, 0.0) + float(v)
    used: dict[str, float] = {}
    for a in actors:
        for k, v in (getattr(a, "required_resources", None) or {}).items():
            used[k] = used.get(k, 0.0) + float(v)
    available = {k: max(0.0, v - used.get(k, 0.0)) for k, v in total.items()}
    jobs = {s: store.list_jobs(status=s, limit=1)[1] for s in ("queued", "running")}
    return ClusterPublic(address=runtime.jobs_api_url,
                         nodes=[{"node_id": n.node_id, "ip": n.node_ip, "state": n.state, "head": n.is_head_node,
                                 "resources": n.resources_total} for n in nodes],
                         resources_total=total, resources_available=available, jobs=jobs)
