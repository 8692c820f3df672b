"""`ladle serve --workers N`: a control process (the dispatcher, the embedded Ray head) and N API processes
on one port, as real processes. They share the connections, decide auth as the control process did, run
jobs through its dispatcher, cancel them on Ray, count event streams per user across processes, are
started again when one dies, and stop with the service (SIGTERM) or on their own when it is killed."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from service.cluster import free_ports, stop_orphan
from service.runtime import STATUS_FILE
from tests.api.test_signals import LADLE, head, stop_and_check
from tests.api.test_signals import serve as serve_as_in_signals
from tests.integration.test_ray import wait_for

pytestmark = pytest.mark.slow

ADMIN = "workers-admin-token-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
QUICK = {"name": "quick", "dense": {"epochs": 1}, "prune": {"target_sparsity": 0.5, "phases": 1},
         "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}
LONG = {"name": "long", "model": {"arch": "resnet20"}, "dense": {"epochs": 20}, "prune": {"target_sparsity": 0.5}}


def serve(home: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """`ladle serve --workers 2` with auth on (an admin token from LADLE_ADMIN_TOKEN), answering."""
    return serve_as_in_signals(home, "--workers", "2", LADLE_AUTH="on", LADLE_ADMIN_TOKEN=ADMIN, **env)


def api_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The control process's running API processes (uvicorn's spawned workers)."""
    found = []
    for p in psutil.Process(proc.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def connections(p: psutil.Process, port: int) -> int:
    return sum(1 for c in p.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "ESTABLISHED")


def job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=AS_ADMIN, timeout=10).json()


def test_two_api_processes_share_the_port_run_and_cancel_jobs_and_stop_with_the_service(tmp_path):
    proc, url = serve(tmp_path, LADLE_SSE_STREAMS_PER_USER="2")
    port = int(url.rsplit(":", 1)[1])
    try:
        workers = wait_for(lambda: len(w := api_processes(proc)) == 2 and w, 60, "two API processes")
        # the control process serves no HTTP; the API processes share the connections
        clients = [httpx.Client(base_url=f"{url}/api/v1", headers=AS_ADMIN, timeout=10) for _ in range(24)]
        try:
            assert all(c.get("/me").json()["admin"] for c in clients)          # each keeps its connection open
            held = [connections(w, port) for w in workers]
            assert connections(psutil.Process(proc.pid), port) == 0
            assert sum(held) == 24 and min(held) > 0, held
        finally:
            for c in clients:
                c.close()
        # auth as the control process decided (on, from LADLE_AUTH), in every process
        assert all(httpx.get(f"{url}/api/v1/jobs", timeout=10).status_code == 401 for _ in range(8))
        health = httpx.get(f"{url}/api/v1/health", timeout=10).json()
        assert health == {"status": "ok", "database": "ok", "ray": "ok"}, health      # the dispatcher's state, published
        status_file = tmp_path / STATUS_FILE
        assert status_file.exists()

        # a job runs through the control process's dispatcher; event streams are capped per user across processes
        quick = httpx.post(f"{url}/api/v1/jobs", json=QUICK, headers=AS_ADMIN, timeout=30).json()["id"]
        streams = [httpx.Client(base_url=f"{url}/api/v1", headers=AS_ADMIN, timeout=30) for _ in range(3)]
        try:
            path = f"/jobs/{quick}/events/stream"
            with streams[0].stream("GET", path) as one, streams[1].stream("GET", path) as two:
                assert one.status_code == two.status_code == 200
                for _ in range(10):        # whichever process takes it, on a new connection each time
                    with httpx.Client(base_url=f"{url}/api/v1", headers=AS_ADMIN, timeout=30) as other:
                        r = other.get(path)
                        assert r.status_code == 429 and "at most 2 per user" in r.json()["detail"], r.text
            wait_for(lambda: streams[2].get(path, timeout=300).status_code == 200, 300, "a freed slot; the job's end")
        finally:
            for c in streams:
                c.close()
        final = wait_for(lambda: (j := job(url, quick))["finished"] and j, 300, "the quick job to finish")
        assert final["status"] == "succeeded", final["error"]

        # a running job is cancelled through an API process: its status, and its Ray job stopped
        long = httpx.post(f"{url}/api/v1/jobs", json=LONG, headers=AS_ADMIN, timeout=30).json()["id"]
        wait_for(lambda: job(url, long)["status"] == "running" and
                 httpx.get(f"{url}/api/v1/jobs/{long}/runs", headers=AS_ADMIN, timeout=10).json()["count"] > 0,
                 180, "the long job to run")
        r = httpx.post(f"{url}/api/v1/jobs/{long}/cancel", headers=AS_ADMIN, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        ray_jobs = JobSubmissionClient(head(tmp_path)["dashboard_url"])
        wait_for(lambda: ray_jobs.get_job_status(long) in (JobStatus.STOPPED, JobStatus.FAILED), 60,
                 "the cancelled job's driver to stop")

        # an API process that dies is started again; the service answers meanwhile
        gone = workers[0]
        gone.kill()
        assert httpx.get(f"{url}/api/v1/health", timeout=10).status_code == 200
        again = wait_for(lambda: len(w := api_processes(proc)) == 2 and gone.pid not in [p.pid for p in w] and w,
                         120, "a new API process")
        assert all(httpx.get(f"{url}/api/v1/me", headers=AS_ADMIN, timeout=10).status_code == 200 for _ in again)
    except BaseException:
        proc.terminate()                     # the service stops its Ray head too
        proc.wait(60)
        raise
    # SIGTERM: the API processes, the Ray head and everything it started go within 15 s
    stop_and_check(proc, signal.SIGTERM, tmp_path)
    assert not status_file.exists()


def test_api_processes_stop_on_their_own_when_the_control_process_is_killed(tmp_path):
    proc, url = serve(tmp_path)
    workers = wait_for(lambda: len(w := api_processes(proc)) == 2 and w, 60, "two API processes")
    orphan = head(tmp_path)
    proc.kill()                                   # SIGKILL: the control process cleans nothing up
    proc.wait()
    try:
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, "API processes outlived their control process"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/api/v1/health", timeout=5)         # nobody holds the port any more
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
        stop_orphan(tmp_path / "ray-head.json")   # as the next start would (test_signals tests that)
    assert orphan["pid"] is not None


def test_a_bad_worker_count_or_a_taken_port_is_refused_before_anything_starts(tmp_path):
    r = subprocess.run([LADLE, "serve", "--port", str(free_ports(1)[0]), "--workers", "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, LADLE_HOME=str(tmp_path)))
    assert r.returncode == 2 and "--workers" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ray-head.json").exists()
    bad = subprocess.run([LADLE, "serve", "--port", str(free_ports(1)[0])], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, LADLE_HOME=str(tmp_path), LADLE_API_WORKERS="many"))
    assert bad.returncode != 0 and "LADLE_API_WORKERS" in bad.stderr.upper() and "Traceback" not in bad.stderr
    with socket.socket() as taken:                # a port another server listens on is refused, not shared
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([LADLE, "serve", "--port", str(taken.getsockname()[1]), "--workers", "2"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=dict(os.environ, LADLE_HOME=str(tmp_path)))
    assert busy.returncode == 3 and "cannot listen on 127.0.0.1" in busy.stderr and "Traceback" not in busy.stderr
    assert not (tmp_path / "ray-head.json").exists()

