"""The dispatcher against a real Ray cluster seen through a fault-injecting double of its Jobs API
(an HTTP proxy that can answer 503 or not answer at all): transient errors never give a job a
second driver, a crash between claim and submit recovers, jobs wait in the queue while Ray is
down and run once it is back, and a job's `timeout` ends it."""

import contextlib
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from ray.job_submission import JobSubmissionClient

from api.app import create_app
from service.dispatcher import Dispatcher, submission_id
from service.runtime import Runtime
from service.settings import Settings
from service.spec import parse_spec
from service.store import Store
from tests.integration.test_ray import driver_pids, wait_for

pytestmark = pytest.mark.slow

QUICK = {"name": "quick", "dense": {"epochs": 2}, "prune": {"target_sparsity": 0.5, "phases": 2},
         "retrain": {"epochs": 2}, "soup": {"ingredients": 2}}


class JobsApiDouble:
    """Forwards to Ray's Jobs API, except: mode "503" answers 503 to every request, "503-info" only
    to reads of a job's state; `down()` stops listening (connection refused) until `up()`."""

    def __init__(self, target: str):
        self.target, self.mode, self.requests = target, "pass", []
        self.port = None
        self.server: ThreadingHTTPServer | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                double.requests.append((self.command, self.path, body))
                info = self.command == "GET" and self.path.startswith("/api/jobs/") and len(self.path) > 11
                if double.mode == "503" or (double.mode == "503-info" and info):
                    self.send_response(503)
                    self.send_header("Content-Length", "11")
                    self.end_headers()
                    self.wfile.write(b"unavailable")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = httpx.request(self.command, double.target + self.path, headers=headers, content=body, timeout=30)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port or 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def submits(self, job_id: str) -> int:
        return sum(1 for m, p, body in self.requests
                   if m == "POST" and p.rstrip("/") == "/api/jobs" and job_id.encode() in body)

    def stops(self) -> int:
        return sum(1 for m, p, _ in self.requests if m == "POST" and p.endswith("/stop"))


@pytest.fixture
def double(ray_head):
    d = JobsApiDouble(ray_head.dashboard_url)
    yield d
    d.down()


@pytest.fixture
def sqlite_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'ladle.db'}"
    store = Store(url)
    yield store, url
    store.engine.dispose()


def python_drivers(job_id: str) -> list[int]:
    """The driver processes of a job (not the shell Ray starts them through)."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if (c := p.info["cmdline"] or []) and "python" in c[0] and c[1:3] == ["-m", "service.driver"]
            and c[3:4] == [job_id]]


def dispatcher_for(store, url, api_url, tmp_path, **kw) -> Dispatcher:
    return Dispatcher(store, api_url, database_url=url, artifacts=str(tmp_path / "artifacts"), interval=0.3, **kw)


def finished(store, job_id, timeout=300):
    return wait_for(lambda: (j := store.get_job(job_id)).status in ("succeeded", "failed", "cancelled") and j,
                    timeout, f"job {job_id} to finish")


def ray_submissions(ray_head, job_id):
    return [j.submission_id for j in JobSubmissionClient(ray_head.dashboard_url).list_jobs()
            if (j.metadata or {}).get("ladle_job") == job_id]


def test_transient_errors_never_give_a_job_a_second_driver(ray_head, double, sqlite_store, tmp_path):
    store, url = sqlite_store
    job = store.create_job(parse_spec(dict(QUICK, dense={"epochs": 4})))
    dispatcher = dispatcher_for(store, url, double.url, tmp_path).start()
    try:
        wait_for(lambda: driver_pids(job.id), 60, "the driver to start")
        double.mode = "503"                                  # the whole Jobs API answers 503 ...
        wait_for(lambda: dispatcher.ray_error, 10, "the dispatcher to notice")
        time.sleep(3)
        double.mode = "503-info"                             # ... then only the reads of job states
        time.sleep(3)
        assert store.get_job(job.id).status == "running" and len(python_drivers(job.id)) == 1
        double.mode = "pass"
        final = finished(store, job.id)
    finally:
        dispatcher.stop()
    assert final.status == "succeeded", final.error
    assert (final.attempts, final.driver_failures, final.ray_submission_id) == (1, 0, job.id)
    assert double.submits(job.id) == 1 and double.stops() == 0
    assert ray_submissions(ray_head, job.id) == [job.id]


def test_the_ray_error_clears_when_the_jobs_api_answers_again(ray_head, double, sqlite_store, tmp_path):
    store, url = sqlite_store
    dispatcher = dispatcher_for(store, url, double.url, tmp_path).start()
    try:
        double.mode = "503"
        wait_for(lambda: dispatcher.ray_error, 10, "the dispatcher to notice")
        double.mode = "pass"
        wait_for(lambda: dispatcher.ray_error is None, 10, "the error to clear")
    finally:
        dispatcher.stop()


def test_a_crash_between_claim_and_submit_recovers(ray_head, double, sqlite_store, tmp_path):
    store, url = sqlite_store
    never_sent, sent = (store.create_job(parse_spec(QUICK)) for _ in range(2))
    claimed = store.claim_queued(2)               # the service claims both and dies: one submit never
    assert {j.id for j in claimed} == {never_sent.id, sent.id}
    # ... went out, the other reached Ray but its submission id was never recorded
    dispatcher = dispatcher_for(store, url, double.url, tmp_path)
    JobSubmissionClient(ray_head.dashboard_url).submit_job(
        entrypoint=f"{sys.executable} -m service.driver {sent.id}", submission_id=submission_id(sent.id, 1),
        runtime_env={"env_vars": dispatcher.env}, metadata={"ladle_job": sent.id, "attempt": "1"})
    assert all(store.get_job(j.id).ray_submission_id is None for j in claimed)
    dispatcher.start()
    try:
        a, b = finished(store, never_sent.id), finished(store, sent.id)
    finally:
        dispatcher.stop()
    assert a.status == b.status == "succeeded", (a.error, b.error)
    assert (a.attempts, a.ray_submission_id, b.attempts, b.ray_submission_id) == (1, never_sent.id, 1, sent.id)
    assert double.submits(never_sent.id) == 1                 # only the one that never went out
    assert ray_submissions(ray_head, sent.id) == [sent.id]
    events = [e.message for e in store.events(sent.id)]
    assert any("found the driver Ray started" in m for m in events)


def test_while_ray_is_down_jobs_stay_queued_and_run_once_it_is_back(ray_head, double, sqlite_store, tmp_path):
    store, url = sqlite_store
    double.down()
    job = store.create_job(parse_spec(QUICK))
    dispatcher = dispatcher_for(store, url, double.url, tmp_path).start()
    runtime = Runtime(Settings(home=tmp_path, database_url=url, ray_address=double.url))
    runtime.store, runtime.dispatcher = store, dispatcher
    try:
        time.sleep(3)
        assert store.get_job(job.id).status == "queued"
        with TestClient(create_app(runtime)) as api:
            health = api.get("/api/v1/health").json()
        assert health["status"] == "degraded" and "does not answer" in health["ray"], health
        double.up()
        # the dispatcher backs off while Ray is down (at most 30 s between tries)
        final = finished(store, job.id, timeout=360)
        with TestClient(create_app(runtime)) as api:
            assert api.get("/api/v1/health").json() == {"status": "ok", "database": "ok", "ray": "ok"}
    finally:
        dispatcher.stop()
    assert final.status == "succeeded", final.error
    assert final.attempts == 1


def test_a_job_past_its_timeout_fails_with_the_reason_and_keeps_what_finished(ray_head, sqlite_store, tmp_path):
    store, url = sqlite_store
    spec = parse_spec({"name": "slow", "dense": {"epochs": 2}, "prune": {"target_sparsity": 0.5, "phases": 1},
                       "model": {"arch": "resnet20"}, "retrain": {"epochs": 500}, "soup": {"ingredients": 2},
                       "timeout": 45})                 # the retraining cannot end within the timeout
    job = store.create_job(spec)
    dispatcher = dispatcher_for(store, url, ray_head.dashboard_url, tmp_path).start()
    try:
        final = finished(store, job.id, timeout=150)
    finally:
        dispatcher.stop()
    assert final.status == "failed" and "timeout" in final.error and "45 s" in final.error, final.error
    assert store.get_model_by_name(job.id, "phase0/dense") is not None          # what finished stays
    client = JobSubmissionClient(ray_head.dashboard_url)
    wait_for(lambda: client.get_job_status(job.id).is_terminal(), 60, "Ray to stop the driver")
    assert str(client.get_job_status(job.id)) == "STOPPED"
    wait_for(lambda: not driver_pids(job.id), 30, "the driver to exit")


def test_a_dead_embedded_head_is_started_again_and_its_jobs_resume(tmp_path):
    spec = parse_spec({"name": "revive", "model": {"arch": "resnet20"}, "dense": {"epochs": 2},
                       "prune": {"target_sparsity": 0.5, "phases": 1}, "retrain": {"epochs": 3},
                       "soup": {"ingredients": 2}})
    with Runtime(Settings(home=tmp_path), num_cpus=2) as rt:
        rt.dispatcher.interval = 0.3
        job = rt.store.create_job(spec)
        wait_for(lambda: python_drivers(job.id), 120, "the driver to start")
        old = rt.head.dashboard_url
        for p in psutil.Process(rt.head.process.pid).children(recursive=True):   # the head crashes: all of it
            with contextlib.suppress(psutil.NoSuchProcess):     # one that ended since it was listed
                p.kill()
        rt.head.process.kill()
        wait_for(lambda: rt.head.dashboard_url != old and rt.dispatcher.ray_error is None, 120,
                 "the dispatcher to start a new head")
        final = finished(rt.store, job.id)
        events = [e.message for e in rt.store.events(job.id)]
    assert final.status == "succeeded", (final.error, events)
    assert final.driver_failures == 0 and final.attempts == 2
    assert any("the embedded Ray head died and was started again" in m for m in events), events


@pytest.mark.postgres
def test_ray_job_listings_show_no_secret_and_the_driver_still_reaches_the_store(ray_head, pg_url, monkeypatch,
                                                                                tmp_path):
    """Anyone who can list Ray jobs reads their runtime_env: the database password and the object
    store's keys stay out of it (the Ray nodes hold them); the job runs all the same (this PostgreSQL
    trusts loopback, so the URL's password is not needed by the driver that never got it)."""
    import sqlalchemy as sa
    from tests.conftest import _truncate
    url = sa.engine.make_url(pg_url).set(password="pg-s3cret").render_as_string(hide_password=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "key-s3cret")
    store = Store(url)
    _truncate(store)
    job = store.create_job(parse_spec(QUICK))
    dispatcher = dispatcher_for(store, url, ray_head.dashboard_url, tmp_path).start()
    try:
        final = finished(store, job.id)
    finally:
        dispatcher.stop()
        store.engine.dispose()
    assert final.status == "succeeded", final.error
    [info] = [j for j in JobSubmissionClient(ray_head.dashboard_url).list_jobs()
              if (j.metadata or {}).get("ladle_job") == job.id]
    shown = repr(info)
    assert not any(secret in shown for secret in ("pg-s3cret", "key-id-s3cret", "key-s3cret")), shown
    assert info.runtime_env["env_vars"]["LADLE_DATABASE_URL"] == sa.engine.make_url(pg_url).render_as_string(
        hide_password=False)
