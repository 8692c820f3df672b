"""API latency under load: a live server (`ladle serve [--workers N]` in its own process; SQLite;
dispatcher off so nothing trains) with 10,000 jobs stored, and 50 concurrent clients on loopback for a
bounded time. Prints p50/p99 latency of GET /jobs/{id}, GET /jobs?limit=50 and POST /jobs, and the
error count, for each number of API processes side by side (a fresh store each).

The clients are wrk connections (Debian's `wrk`, a C load generator; `make bench` installs it), so
that the load costs the server's two cores almost nothing: 30 connections read single jobs, 15 read
pages of the list and 5 submit, each as its own wrk process, all at once. `--think` sets the mean
pause of each client between its requests (0: back to back, the server saturated).

    .venv/bin/python bench/api_load.py [--jobs 10000] [--clients 50] [--seconds 20] [--think 0 0.1] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import service  # noqa: F401,I001  first: Ray's environment (loopback only) before ray is imported
import httpx
from rich.console import Console
from rich.table import Table

from service.cluster import LocalRay, free_ports
from service.orm import Job
from service.spec import parse_spec
from service.store import Store

SPEC = {"name": "load", "prune": {"target_sparsity": 0.5, "phases": 1}, "soup": {"ingredients": 2}}
# (label, share of the clients, Lua that makes one request, target p99 in ms)
KINDS = (
    ("GET /jobs/{id}", 6, 'wrk.format("GET", "/api/v1/jobs/" .. ids[math.random(#ids)])', 20),
    ("GET /jobs?limit=50", 3, 'wrk.format("GET", "/api/v1/jobs?limit=50&offset=" .. math.random(0, 4999))', 20),
    ("POST /jobs", 1, 'wrk.format("POST", "/api/v1/jobs", {["Content-Type"] = "application/json"}, body)', 50),
)
LUA = """
local ids = {{}}
for line in io.lines("{ids}") do ids[#ids + 1] = line end
local body = '{body}'
local think = {think_ms}
function request() return {make} end
function delay() if think > 0 then return math.random(math.floor(think / 2), math.floor(think * 3 / 2)) end return 0 end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{{"requests": %d, "p50": %f, "p99": %f, "errors": %d}}\\n', summary.requests,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def seed_jobs(store, n: int) -> list[str]:
    """n queued jobs in one transaction (the load is on the API, not on filling the table)."""
    spec = parse_spec(SPEC).model_dump(mode="json")
    ids = [uuid.uuid4().hex for _ in range(n)]
    with store.tx() as s:
        s.add_all([Job(id=i, name=f"seed-{k}", status="queued", spec=spec) for k, i in enumerate(ids)])
    if store.engine.dialect.name == "postgresql":     # what autovacuum would have done by now
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM ANALYZE jobs")
    return ids


def run_load(base: str, tmp: Path, clients: int, seconds: float, think: float) -> list[dict]:
    """All kinds at once, one wrk process each; returns wrk's figures per kind."""
    shares = sum(k[1] for k in KINDS)
    procs = []
    for i, (label, share, make, target) in enumerate(KINDS):
        script = tmp / f"load{i}.lua"
        script.write_text(LUA.format(ids=tmp / "ids.txt", body=json.dumps(SPEC), think_ms=int(think * 1000),
                                     make=make))
        conns = max(1, round(clients * share / shares))
        procs.append((label, conns, target, subprocess.Popen(
            ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script), base],
            stdout=subprocess.PIPE, text=True)))
    out = []
    for label, conns, target, p in procs:
        stdout, _ = p.communicate()
        if p.returncode or not stdout.strip():
            raise RuntimeError(f"wrk failed for {label}")
        result = json.loads(stdout.strip().splitlines()[-1])
        out.append(dict(result, label=label, clients=conns, target=target))
    return out


def service_times(base: str, tmp: Path, seconds: float = 5.0) -> dict[str, float]:
    """Each kind alone, one connection back to back: its mean latency is the server's time per request
    of that kind with nothing queued (the figure that sets how much load the event loop takes)."""
    out = {}
    for i, (label, _, make, _) in enumerate(KINDS):
        script = tmp / f"alone{i}.lua"
        script.write_text(LUA.format(ids=tmp / "ids.txt", body=json.dumps(SPEC), think_ms=0, make=make))
        p = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds:g}s", "-s", str(script), base], capture_output=True,
                           text=True, check=True)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        out[label] = seconds * 1000 / max(r["requests"], 1)
    return out


def serve(tmp: Path, url: str, ray_address: str, workers: int) -> tuple[subprocess.Popen, str]:
    """`ladle serve --workers N` on a free port, answering."""
    port = free_ports(1)[0]
    env = dict(os.environ, LADLE_HOME=str(tmp), LADLE_DATABASE_URL=url, LADLE_RAY_ADDRESS=ray_address,
               LADLE_DISPATCH="false")
    server = subprocess.Popen([str(Path(sys.executable).with_name("ladle")), "serve", "--port", str(port),
                               "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                server.wait(30)
                raise RuntimeError("the server did not start") from None
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--database-url", default=None, help="a database to use instead of a fresh SQLite file per "
                                                         "server (emptied of jobs first is up to you)")
    ap.add_argument("--think", type=float, nargs="+", default=[0.0, 0.1],
                    help="mean seconds each client waits between requests; 0 = back to back (saturation)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="API processes of the server (one run each)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/api_load.py needs wrk: apt-get install wrk (make bench does)")
    console = Console(width=120)
    results = []
    with LocalRay(num_cpus=1) as head:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmpdir:
                tmp = Path(tmpdir)
                url = args.database_url or f"sqlite:///{tmp}/ladle.db"
                t0 = time.perf_counter()
                ids = seed_jobs(Store(url), args.jobs)
                (tmp / "ids.txt").write_text("\n".join(ids) + "\n")
                console.print(f"{args.jobs} jobs stored in {time.perf_counter() - t0:.1f} s ({url}); "
                              f"ladle serve --workers {workers}")
                server, base = serve(tmp, url, head.dashboard_url, workers)
                try:
                    alone = service_times(base, tmp)
                    loads = [(think, run_load(base, tmp, args.clients, args.seconds, think)) for think in args.think]
                finally:
                    server.terminate()
                    server.wait(60)
                results.append((workers, alone, loads))
    for workers, alone, loads in results:
        console.print(f"[bold]{workers} API process{'es' if workers > 1 else ''}[/]: time per request, each kind "
                      "alone on one connection (no queueing): "
                      + ", ".join(f"{k} {v:.2f} ms" for k, v in alone.items()), highlight=False)
        for think, rows in loads:
            load = "back to back" if not think else f"~{think:g} s think time between requests"
            table = Table(title=f"--workers {workers}: {args.clients} concurrent clients (wrk), {load}, "
                                f"{args.seconds:g} s, {args.jobs} jobs stored")
            for col in ("request", "clients", "requests", "req/s", "p50 ms", "p99 ms", "target p99", "errors"):
                table.add_column(col, justify="right")
            for r in rows:
                ok = "[green]met[/]" if r["p99"] <= r["target"] else "[red]missed[/]"
                table.add_row(r["label"], str(r["clients"]), str(r["requests"]), f"{r['requests'] / args.seconds:.0f}",
                              f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"≤ {r['target']} ms {ok}", str(r["errors"]))
            console.print(table)


if __name__ == "__main__":
    main()
