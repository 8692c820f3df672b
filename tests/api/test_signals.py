"""Stopping the service with real signals: `ladle serve`, `ladle run` and `ladle demo` stop their
embedded Ray head and every process it started (drivers and workers included) within 15 s on
SIGTERM, SIGINT and SIGHUP; a running job goes back to the queue and resumes on the next start; a
head left behind by a service killed with SIGKILL is stopped by the next start."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

from service.cluster import free_ports
from tests.conftest import dies_with_the_tests
from tests.integration.test_ray import wait_for

pytestmark = pytest.mark.slow

LADLE = str(Path(sys.executable).with_name("ladle"))
STOP_WITHIN = 15.0
# Long enough to be running when the signal comes: phases of ResNet-20 on digits
JOB = {"name": "long", "model": {"arch": "resnet20"}, "dense": {"epochs": 2},
       "prune": {"target_sparsity": 0.75, "phases": 2}, "retrain": {"epochs": 4}, "soup": {"ingredients": 2}}


def start(args: list[str], home: Path, **env: str) -> subprocess.Popen:
    log = open(home / f"{args[0]}-{time.time_ns()}.log", "wb")
    return subprocess.Popen([LADLE, *args], env=dict(os.environ, LADLE_HOME=str(home), **env), cwd=home, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=dies_with_the_tests)


def serve(home: Path, *args: str, **env: str) -> tuple[subprocess.Popen, str]:
    """`ladle serve [args]` on a free port (LADLE_* from `env`), answering."""
    port = free_ports(1)[0]
    proc = start(["serve", "--port", str(port), *args], home, **env)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, f"ladle serve exited with {proc.returncode}"
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False
    wait_for(up, 180, "ladle serve to answer")
    return proc, url


def head(home: Path) -> dict:
    return json.loads((home / "ray-head.json").read_text())


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def ray_heads(temp_dir: str) -> list[psutil.Process]:
    """The `ray start --head` processes of the head whose temp dir this is."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray" in cmd and " start " in f" {cmd} " and "--head" in cmd and f"--temp-dir={temp_dir}" in cmd:
            found.append(p)
    return found


def stop_and_check(proc: subprocess.Popen, sig: int, home: Path) -> float:
    """Send `sig`; every process of the service's tree (taken just before) must be gone within
    STOP_WITHIN seconds, with the head's temp dir and identity file. Returns the seconds it took."""
    ident = head(home)
    procs = tree(proc.pid)[1:]             # the service itself is waited for by Popen, which reaps it
    assert any("raylet" in " ".join(p.cmdline()) for p in procs if p.is_running())
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(STOP_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the service still runs {STOP_WITHIN} s after {signal.Signals(sig).name}")
    gone, alive = psutil.wait_procs(procs, timeout=max(0.0, STOP_WITHIN - (time.monotonic() - t0)))
    took = time.monotonic() - t0
    print(f"{signal.Signals(sig).name}: stopped in {took:.1f} s")
    assert not alive, f"{len(alive)} processes left {STOP_WITHIN} s after {signal.Signals(sig).name}: " + \
        "; ".join(" ".join(p.cmdline())[:120] for p in alive if p.is_running())
    assert not ray_heads(ident["temp_dir"])
    assert not Path(ident["temp_dir"]).exists() and not (home / "ray-head.json").exists()
    return took


def training(home: Path) -> bool:
    """Whether the service at `home` has recorded a run: a job's driver has started and trains."""
    engine = sa.create_engine(f"sqlite:///{home / 'ladle.db'}")
    try:
        with engine.connect() as c:
            return c.execute(sa.text("select count(*) from runs")).scalar() > 0
    except sa.exc.OperationalError:                    # no database or no tables yet
        return False
    finally:
        engine.dispose()


def job_row(home: Path, job_id: str) -> dict:
    engine = sa.create_engine(f"sqlite:///{home / 'ladle.db'}")
    try:
        with engine.connect() as c:
            row = c.execute(sa.text("select * from jobs where id = :id"), {"id": job_id}).mappings().one()
            events = [r[0] for r in c.execute(sa.text("select message from events where job_id = :id order by id"),
                                              {"id": job_id})]
        return dict(row, events=events)
    finally:
        engine.dispose()


def test_a_job_running_when_serve_stops_resumes_on_the_next_start(tmp_path):
    proc, url = serve(tmp_path)
    job = httpx.post(f"{url}/api/v1/jobs", json=JOB, timeout=30).json()
    # stop it while phase 1's ingredients train on their Ray workers
    wait_for(lambda: any(r["name"].startswith("phase1/") for r in
                         httpx.get(f"{url}/api/v1/jobs/{job['id']}/runs", timeout=10).json()["data"]),
             300, "phase 1 to start")
    stop_and_check(proc, signal.SIGTERM, tmp_path)
    row = job_row(tmp_path, job["id"])
    assert row["status"] == "queued" and row["ray_submission_id"] is None
    assert "the service stopped while the job ran" in row["events"][-1]
    proc, url = serve(tmp_path)
    final = wait_for(lambda: (j := httpx.get(f"{url}/api/v1/jobs/{job['id']}", timeout=10).json())["status"]
                     not in ("queued", "running") and j, 600, "the job to finish")
    stop_and_check(proc, signal.SIGINT, tmp_path)
    assert final["status"] == "succeeded", final["error"]
    row = job_row(tmp_path, job["id"])
    assert (row["attempts"], row["driver_failures"]) == (2, 0)       # a new driver, none lost
    assert any("resum" in e for e in row["events"])


def test_after_serve_is_killed_the_next_start_stops_the_orphaned_head_and_sighup_stops_it(tmp_path):
    """(SIGTERM and SIGINT to serve: in the test above, with a job running.)"""
    proc, _ = serve(tmp_path)
    orphan = head(tmp_path)
    orphan_tree = [p for p in tree(proc.pid) if p.pid != proc.pid]
    proc.kill()                                        # SIGKILL: no clean-up at all
    proc.wait()
    time.sleep(1)
    assert len(ray_heads(orphan["temp_dir"])) == 1     # the head lives on without its service
    proc, _ = serve(tmp_path)
    try:
        _, alive = psutil.wait_procs(orphan_tree, timeout=1)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
        assert not ray_heads(orphan["temp_dir"]) and not Path(orphan["temp_dir"]).exists()
        assert len(ray_heads(head(tmp_path)["temp_dir"])) == 1        # exactly one head: the new one
    finally:
        stop_and_check(proc, signal.SIGHUP, tmp_path)


def test_run_stops_its_ray_head_on_sigterm_and_the_job_waits(tmp_path):
    (tmp_path / "job.yaml").write_text(json.dumps(JOB))
    proc = start(["run", "job.yaml"], tmp_path)
    wait_for(lambda: (tmp_path / "ray-head.json").exists() and proc.poll() is None, 120, "the head to start")
    wait_for(lambda: training(tmp_path), 120, "the driver to train")
    stop_and_check(proc, signal.SIGTERM, tmp_path)
    assert proc.returncode == 130
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'ladle.db'}")
    with engine.connect() as c:
        assert c.execute(sa.text("select status from jobs")).scalars().all() == ["queued"]
    engine.dispose()


def test_demo_stops_its_ray_head_on_sighup(tmp_path):
    proc = start(["demo", "--small", "--no-serve", "--port", "0"], tmp_path)
    wait_for(lambda: (tmp_path / "ray-head.json").exists() and proc.poll() is None, 120, "the head to start")
    wait_for(lambda: training(tmp_path), 120, "the demo job's driver to train")
    stop_and_check(proc, signal.SIGHUP, tmp_path)


def test_a_second_service_on_the_same_home_is_refused_with_a_message(tmp_path):
    proc, _ = serve(tmp_path)
    try:
        second = subprocess.run([LADLE, "serve", "--port", str(free_ports(1)[0])], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60, env=dict(os.environ, LADLE_HOME=str(tmp_path)))
        assert second.returncode == 2 and "another Ladle service" in second.stderr and "Traceback" not in second.stderr
        assert len(ray_heads(head(tmp_path)["temp_dir"])) == 1
    finally:
        stop_and_check(proc, signal.SIGTERM, tmp_path)
