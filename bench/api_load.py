"""API latency under load: a live server (`ladle serve` in its own process; SQLite; dispatcher off
so nothing trains) with 10,000 jobs stored, and 50 concurrent clients on loopback for a bounded
time. Prints p50/p99 latency of GET /jobs/{id}, GET /jobs?limit=50 and POST /jobs, and the error
count.

    .venv/bin/python bench/api_load.py [--jobs 10000] [--clients 50] [--seconds 20] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
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


def seed_jobs(store, n: int) -> list[str]:
    """n queued jobs in one transaction (the load is on the API, not on filling the table)."""
    import uuid
    spec = parse_spec(SPEC).model_dump(mode="json")
    ids = [uuid.uuid4().hex for _ in range(n)]
    with store.tx() as s:
        s.add_all([Job(id=i, name=f"seed-{k}", status="queued", spec=spec) for k, i in enumerate(ids)])
    return ids


async def client(url: str, ids: list[str], until: float, lat: dict[str, list[float]], errors: list[str],
                 think: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while time.perf_counter() < until:
            if think:
                await asyncio.sleep(random.uniform(0.5, 1.5) * think)
            kind = random.choices(("get", "list", "post"), weights=(6, 3, 1))[0]
            t0 = time.perf_counter()
            try:
                if kind == "get":
                    r = await http.get(f"/api/v1/jobs/{random.choice(ids)}")
                elif kind == "list":
                    r = await http.get("/api/v1/jobs", params={"limit": 50, "offset": random.randrange(0, 5000)})
                else:
                    r = await http.post("/api/v1/jobs", json=SPEC)
                if r.status_code >= 400:
                    errors.append(f"{kind} {r.status_code}")
            except httpx.HTTPError as e:
                errors.append(f"{kind} {type(e).__name__}")
                continue
            lat[kind].append(time.perf_counter() - t0)


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] * 1000 if len(xs) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--think", type=float, nargs="+", default=[0.0, 0.5],
                    help="mean seconds each client waits between requests; 0 = back to back (saturation)")
    args = ap.parse_args()
    console = Console(width=120)
    with tempfile.TemporaryDirectory() as tmp, LocalRay(num_cpus=1) as head:
        url = args.database_url or f"sqlite:///{tmp}/ladle.db"
        t0 = time.perf_counter()
        ids = seed_jobs(Store(url), args.jobs)
        console.print(f"{args.jobs} jobs stored in {time.perf_counter() - t0:.1f} s ({url})")
        port = free_ports(1)[0]
        env = dict(os.environ, LADLE_HOME=tmp, LADLE_DATABASE_URL=url, LADLE_RAY_ADDRESS=head.dashboard_url,
                   LADLE_DISPATCH="false")
        server = subprocess.Popen([str(Path(sys.executable).with_name("ladle")), "serve", "--port", str(port)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.3)
            results = []
            for think in args.think:
                lat: dict[str, list[float]] = {"get": [], "list": [], "post": []}
                errors: list[str] = []
                until = time.perf_counter() + args.seconds

                async def run() -> None:
                    await asyncio.gather(*(client(base, ids, until, lat, errors, think)
                                           for _ in range(args.clients)))
                asyncio.run(run())
                results.append((think, lat, errors))
        finally:
            server.terminate()
            server.wait(30)
    for think, lat, errors in results:
        load = "back to back" if not think else f"~{think:g} s think time between requests"
        table = Table(title=f"{args.clients} concurrent clients, {load}, {args.seconds:.0f} s, {args.jobs} jobs stored")
        for col in ("request", "count", "req/s", "p50 ms", "p99 ms", "target p99"):
            table.add_column(col, justify="right")
        for kind, label, target in (("get", "GET /jobs/{id}", "≤ 20 ms"), ("list", "GET /jobs?limit=50", "≤ 20 ms"),
                                    ("post", "POST /jobs", "≤ 50 ms")):
            xs = lat[kind]
            table.add_row(label, str(len(xs)), f"{len(xs) / args.seconds:.0f}", f"{pct(xs, 50):.1f}",
                          f"{pct(xs, 99):.1f}", target)
        console.print(table)
        console.print(f"errors: {len(errors)}" + (f" (first: {errors[:5]})" if errors else ""))


if __name__ == "__main__":
    main()
