"""Web hardening (issue 15), in-process without Ray: browser security headers on every response, /docs from
vendored assets, the request body limit, downloads checked against the store's sha256 (server, SDK, CLI),
the event stream's lifetime and per-user cap, the job list without specs, and uvicorn's header limits.
A few tests run the app under uvicorn in a thread (`live`: real HTTP, still no Ray); the browser test
loads the dashboard and /docs in Debian's Chromium under the policy."""

import base64
import gc
import hashlib
import logging
import re
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.app import DASHBOARD, create_app
from api.client import ChecksumMismatch, Client, DownloadError
from api.hardening import CSP, StreamSlots
from api.routes.models import CorruptArtifact
from api.server import uvicorn_config
from service.cluster import free_ports
from service.recorders import DBRecorder
from service.records import ModelRecord
from tests.api.test_routes import sdk

JOB = {"name": "web", "dense": {"epochs": 3}, "prune": {"target_sparsity": 0.75, "phases": 2},
       "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}
SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def submit(api, token: str | None = None, **spec) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = api.post("/jobs", json={**JOB, **spec}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def assert_secured(r: httpx.Response) -> None:
    for name, value in SECURITY.items():
        assert r.headers.get(name) == value, (r.url, name, r.headers)
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp, csp


@pytest.fixture
def root(api):
    """The same app, at its root (the dashboard, /docs) rather than /api/v1."""
    return TestClient(api.app, base_url="http://localhost")


# ---------------------------------------------------------------- headers and /docs

def test_security_headers_on_api_json_errors_the_dashboard_and_docs(api, root):
    for r in (api.get("/health"), api.get("/jobs"), api.get("/jobs/nope"), api.get("/jobs/a%00b"),
              api.post("/jobs", json={"prune": {"phases": 0}}), root.get("/"), root.get("/dashboard/app.js"),
              root.get("/dashboard/vendor/chart.umd.min.js"), root.get("/docs"), root.get("/api/v1/openapi.json")):
        assert r.status_code in (200, 404, 422), r.url
        assert_secured(r)
    assert api.get("/health").headers["content-security-policy"] == CSP
    assert "script-src 'self';" in CSP and "style-src 'self';" in CSP


def test_an_unhandled_error_has_the_headers_too(api):
    def boom():
        raise RuntimeError("boom")
    api.app.add_api_route("/boom", boom)
    r = TestClient(api.app, raise_server_exceptions=False, base_url="http://localhost").get("/boom")
    assert r.status_code == 500 and r.text == "Internal Server Error"
    assert_secured(r)


def test_the_dashboard_needs_no_inline_script_or_style(root):
    """The policy allows no inline script or style: the page and its script carry none (the browser test
    below loads them under the policy)."""
    html = root.get("/").text
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [] and "<style" not in html
    for text in (html, (DASHBOARD / "app.js").read_text()):
        assert not re.search(r"\sstyle=|\son[a-z]+=\"|javascript:", text)
    for src in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert src.startswith("/") or src == "data:,", src
        assert src == "data:," or root.get(src).status_code == 200, src


def test_docs_load_only_local_assets_and_their_one_inline_script_is_allowed_by_hash(root):
    r = root.get("/docs")
    assert r.status_code == 200 and "SwaggerUIBundle" in r.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert {a for a in assets if a.startswith("/")} == {"/dashboard/vendor/swagger-ui.css",
                                                      "/dashboard/vendor/swagger-ui-bundle.js"}
    assert all(a.startswith("/") or a == "data:," for a in assets), assets
    assert not re.search(r"https?://", r.text), "the page names a remote URL"
    for a in assets:
        if a.startswith("/"):
            got = root.get(a)
            assert got.status_code == 200 and len(got.content) > 10_000, a
    inline = re.findall(r"<script>(.*?)</script>", r.text, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert len(inline) == 1 and f"script-src 'self' 'sha256-{digest}';" in r.headers["content-security-policy"]
    assert_secured(r)
    assert root.get("/api/v1/openapi.json").status_code == 200
    assert root.get("/redoc").status_code == 404 and root.get("/docs/oauth2-redirect").status_code == 404


# ---------------------------------------------------------------- request body limit

def jobs_stored(api) -> int:
    return api.get("/jobs").json()["count"]


def test_an_oversized_body_is_413_naming_the_limit_and_nothing_is_stored(api):
    big = b'{"name": "' + b"x" * (1 << 20) + b'"}'
    r = api.post("/jobs", content=big, headers={"Content-Type": "application/json"})     # with Content-Length
    assert r.status_code == 413 and r.json() == {
        "detail": "the request body is larger than the limit of 1 MiB (1048576 bytes)"}
    assert r.headers["connection"] == "close"
    assert_secured(r)

    def chunked():
        yield b'{"name": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'
    r = api.post("/jobs", content=chunked(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "1 MiB" in r.json()["detail"]
    assert jobs_stored(api) == 0
    # the limit is a setting; a body under it is fine
    api.runtime.settings.max_body_bytes = 400
    body = '{"name": "small"%s}'                   # JSON whitespace makes it long
    assert api.post("/jobs", content=body % (" " * 300), headers={"Content-Type": "application/json"}).status_code == 201
    r = api.post("/jobs", content=body % (" " * 400), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == "the request body is larger than the limit of 400 bytes"
    assert jobs_stored(api) == 1


def test_a_streamed_body_is_refused_once_past_the_limit_not_read_whole(api):
    """Chunks as uvicorn hands them over, 10 MiB in all, with no Content-Length: the app stops asking for
    more soon after 1 MiB and answers 413."""
    chunk, asked, sent = b"x" * 65536, [], []

    async def receive():
        asked.append(1)
        return {"type": "http.request", "body": chunk, "more_body": len(asked) < 160}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/api/v1/jobs", "raw_path": b"/api/v1/jobs",
             "root_path": "", "query_string": b"", "server": ("localhost", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")], "state": {}}
    api.portal.call(api.app, scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert len(asked) == (1 << 20) // len(chunk) + 1          # the first chunk past the limit, no more
    assert jobs_stored(api) == 0


def test_a_submission_waiting_for_the_database_stalls_no_other_request(api):
    """POST /jobs parses, validates and writes on a worker thread: while one waits for SQLite's write lock
    (held here by another connection, as a driver's long write or a WAL checkpoint would), reads are
    answered at once (on the event loop, WAL readers take no lock)."""
    job_id = submit(api)
    db = sqlite3.connect(api.store.engine.url.database, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")                     # the write lock, held
    posted: list[int] = []
    writer = threading.Thread(target=lambda: posted.append(api.post("/jobs", json=JOB).status_code))
    try:
        writer.start()
        time.sleep(0.3)                               # the submission is waiting for the lock by now
        assert writer.is_alive() and not posted
        t0 = time.perf_counter()
        assert api.get(f"/jobs/{job_id}").status_code == 200 and api.get("/jobs").json()["count"] == 1
        assert time.perf_counter() - t0 < 0.5, "a read waited for the submission's write"
    finally:
        db.execute("ROLLBACK")
        db.close()
    writer.join(30)
    assert posted == [201] and jobs_stored(api) == 2


def test_a_body_that_is_not_json_is_a_422_naming_it(api):
    r = api.post("/jobs", content=b'{"name": "x",', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
    assert r.json()["detail"][0]["msg"].startswith("JSON decode error")
    assert jobs_stored(api) == 0


# ---------------------------------------------------------------- downloads

@pytest.fixture
def stored_model(api, tmp_path):
    """A model of a job, its file (2.5 MiB: three chunks as the server reads it) recorded with its size and sha256."""
    job_id = submit(api)
    data = uuid.uuid4().bytes * (5 * 2**15 + 1)
    path = tmp_path / "artifacts" / "m.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    model = ModelRecord(id=uuid.uuid4().hex, kind="dense", phase=0, name="phase0/dense", uri=str(path),
                        size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), sparsity=0.0, nonzeros=1,
                        metrics={}, parents=[])
    DBRecorder(api.store, job_id).model_saved(model)
    model.path, model.data = path, data
    return model


def tamper(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_good_download_carries_the_stores_sha256_and_arrives_whole(api, stored_model, tmp_path):
    r = api.get(f"/models/{stored_model.id}/download")
    assert r.status_code == 200 and r.content == stored_model.data
    assert r.headers["x-checksum-sha256"] == stored_model.sha256 == hashlib.sha256(r.content).hexdigest()
    assert int(r.headers["content-length"]) == len(stored_model.data)
    with sdk(api) as c:
        out = c.download(stored_model.id, tmp_path / "got.safetensors")
    assert out.read_bytes() == stored_model.data and [p.name for p in out.parent.glob(".*")] == []


def test_the_server_breaks_off_a_download_whose_file_was_tampered_with(api, stored_model, caplog):
    tamper(stored_model.path, at=len(stored_model.data) - 10)      # in the last chunk: found at the very end
    with pytest.raises(CorruptArtifact, match="does not match the store"):
        api.get(f"/models/{stored_model.id}/download")
    assert any(r.levelno == logging.ERROR and stored_model.id in r.getMessage() and "broken off" in r.getMessage()
               for r in caplog.records)
    # what a client gets: fewer bytes than the Content-Length, never the last chunk
    r = TestClient(api.app, base_url=str(api.base_url), raise_server_exceptions=False).get(
        f"/models/{stored_model.id}/download")
    assert int(r.headers["content-length"]) == len(stored_model.data) and len(r.content) == 2 << 20
    # a file longer than recorded: cut off before the excess
    stored_model.path.write_bytes(stored_model.data + b"more")
    with pytest.raises(CorruptArtifact, match="longer than"):
        api.get(f"/models/{stored_model.id}/download")


def test_the_sdk_refuses_a_tampered_download_and_leaves_no_file(api, stored_model, tmp_path):
    tamper(stored_model.path)
    out = tmp_path / "got.safetensors"
    with sdk(api, raise_server_exceptions=False) as c:
        with pytest.raises(ChecksumMismatch, match=f"download of model {stored_model.id} is damaged.*"
                                                   f"server's checksum is {stored_model.sha256}"):
            c.download(stored_model.id, out)
    assert list(tmp_path.glob("got*")) == [] and list(tmp_path.glob(".got*")) == []


def test_the_sdk_checks_the_bytes_against_the_header_itself(tmp_path):
    """A server (or proxy) that sends every byte under a checksum they do not match: the SDK refuses."""
    def handler(request):
        return httpx.Response(200, content=b"abc" * 1000, headers={"X-Checksum-Sha256": "0" * 64})
    c = Client(http=httpx.Client(base_url="http://x/api/v1", transport=httpx.MockTransport(handler)))
    with pytest.raises(ChecksumMismatch, match="3000 bytes with sha256"):
        c.download("m", tmp_path / "m.safetensors")
    c.http = httpx.Client(base_url="http://x/api/v1", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, content=b"abc")))
    with pytest.raises(DownloadError, match="without its checksum"):
        c.download("m", tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- event streams

def blocks(text: str) -> list[str]:
    return [b for b in text.split("\n\n") if b]


def kind(block: str) -> str:
    line = block.split("\n")[1 if block.startswith("id:") else 0]
    return line if line.startswith(":") else line.removeprefix("event: ")


def open_streams(api):
    return dict(api.app.state.streams.held)


@pytest.mark.timeout(60)
def test_a_stream_ends_when_its_job_ends(api):
    job_id = submit(api)
    api.store.claim_queued(1)
    timer = threading.Timer(1.0, lambda: api.store.job_succeeded(job_id, uuid.uuid4().hex))
    timer.start()
    t0 = time.monotonic()
    with api.stream("GET", f"/jobs/{job_id}/events/stream") as r:
        text = r.read().decode()
    timer.join()
    assert 1.0 <= time.monotonic() - t0 < 10
    assert [kind(b) for b in blocks(text)][-1] == "end" and blocks(text)[-1].endswith('{"status": "succeeded"}')
    assert "running" in text and "succeeded" in text
    assert open_streams(api) == {}


@pytest.mark.timeout(60)
def test_a_stream_of_a_job_that_never_ends_ends_after_its_lifetime_and_resumes_from_last_event_id(api):
    api.runtime.settings.sse_max_seconds = 1.5
    job_id = submit(api)
    api.store.claim_queued(1)                 # running, and nothing will end it
    api.store.event(job_id, "before the stream")
    t0 = time.monotonic()
    with api.stream("GET", f"/jobs/{job_id}/events/stream") as r:
        text = r.read().decode()
    assert 1.5 <= time.monotonic() - t0 < 5
    got = blocks(text)
    assert "end" not in [kind(b) for b in got] and got[-1].startswith(": this stream's time is up: reconnect")
    last = max(int(b.split("\n")[0].removeprefix("id: ")) for b in got if b.startswith("id:"))
    assert open_streams(api) == {}
    # the client reconnects with the last id it saw: only what came after
    api.store.event(job_id, "after the reconnect")
    with api.stream("GET", f"/jobs/{job_id}/events/stream", headers={"Last-Event-ID": str(last)}) as r:
        again = blocks(r.read().decode())
    events = [b for b in again if b.startswith("id:")]
    assert len(events) == 1 and "after the reconnect" in events[0]
    assert int(events[0].split("\n")[0].removeprefix("id: ")) > last
    assert api.get(f"/jobs/{job_id}/events/stream", headers={"Last-Event-ID": "x"}).status_code == 422


@pytest.mark.timeout(60)
def test_open_streams_are_capped_per_user_and_every_way_a_stream_ends_frees_its_slot(api_auth):
    api = api_auth                                   # auth on: streams are counted per user
    settings = api.runtime.settings
    settings.sse_streams_per_user, settings.sse_max_seconds = 2, 2.0
    _, alice = api.store.create_token("alice")
    _, bob = api.store.create_token("bob")
    time.sleep(1.1)                           # auth answers may be a second old (api.deps.AUTH_MAX_AGE)
    as_alice, as_bob = ({"Authorization": f"Bearer {t}"} for t in (alice, bob))
    job_id = submit(api, alice)
    api.store.claim_queued(1)
    path = f"/jobs/{job_id}/events/stream"
    with api.stream("GET", path, headers=as_alice) as one, api.stream("GET", path, headers=as_alice) as two:
        assert one.status_code == two.status_code == 200
        assert open_streams(api) == {"alice": 2}
        r = api.get(path, headers=as_alice)
        assert r.status_code == 429 and r.json()["detail"].startswith("too many open event streams: at most 2 per user")
        bob_job = submit(api, bob)
        with api.stream("GET", f"/jobs/{bob_job}/events/stream", headers=as_bob) as other:     # bob has his own
            assert other.status_code == 200 and open_streams(api) == {"alice": 2, "bob": 1}
        next(two.iter_lines())                # alice's second stream: read a little, then the client goes away
    deadline = time.monotonic() + 5
    while open_streams(api) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_streams(api) == {}, "a stream's slot was not given back when its client left"
    # a stream that runs to its lifetime gives its slot back too
    with api.stream("GET", path, headers=as_alice) as r:
        assert open_streams(api) == {"alice": 1}
        r.read()
    assert open_streams(api) == {}


# ---------------------------------------------------------------- the job list

def test_the_job_list_leaves_specs_out_unless_asked_and_keeps_metric_and_phase_count(api):
    job_id = submit(api, prune={"target_sparsity": 0.75, "phases": 4})
    plain = api.get("/jobs").json()["data"][0]
    assert plain["id"] == job_id and plain["spec"] is None
    assert plain["phases_total"] == 4 and plain["metric"] == {"name": "accuracy", "mode": "max", "percent": True}
    full = api.get("/jobs", params={"include_spec": "true"}).json()["data"][0]
    assert full["spec"]["prune"]["phases"] == 4 and full["spec"]["name"] == "web"
    assert {k: v for k, v in full.items() if k != "spec"} == {k: v for k, v in plain.items() if k != "spec"}
    one = api.get(f"/jobs/{job_id}").json()                       # a single job has its spec
    assert one["spec"] == full["spec"] and one["phases_total"] == 4
    with sdk(api) as c:
        assert c.jobs()["data"][0]["spec"] is None
        assert c.jobs(include_spec=True)["data"][0]["spec"]["prune"]["phases"] == 4
    assert len(api.get("/jobs").content) < len(api.get("/jobs", params={"include_spec": "true"}).content) / 2


# ---------------------------------------------------------------- under uvicorn (real HTTP)

@pytest.fixture
def live(api):
    """The app under uvicorn (Ladle's config) on a free loopback port, in a thread; the api fixture's
    runtime, whose settings a test may change first."""
    settings = api.runtime.settings
    settings.http_header_seconds, settings.http_max_header_bytes = 1.0, 4096
    port = free_ports(1)[0]
    server = uvicorn.Server(uvicorn_config(create_app(api.runtime, auth=False), settings, host="127.0.0.1", port=port,
                                           log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.should_exit = True
    thread.join(15)


def test_uvicorn_runs_with_the_settings_limits(api):
    s = api.runtime.settings
    config = uvicorn_config(object(), s)
    assert (config.timeout_keep_alive, config.limit_concurrency, config.timeout_graceful_shutdown,
            config.h11_max_incomplete_event_size) == (s.http_keep_alive_seconds, s.http_max_concurrency,
                                                      s.http_shutdown_seconds, s.http_max_header_bytes)
    assert (config.http.header_seconds, config.http.max_header_bytes) == (s.http_header_seconds, s.http_max_header_bytes)


def raw(url: str, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; what the server answers until it closes, and how long that took."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        t0 = time.monotonic()
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out, time.monotonic() - t0


@pytest.mark.timeout(60)
def test_a_client_slow_with_its_headers_or_sending_too_many_is_cut_off(live):
    out, took = raw(live.url, b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n")      # the headers never end
    assert out.startswith(b"HTTP/1.1 408 ") and 0.9 <= took < 4
    out, _ = raw(live.url, b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"p" * 8000)
    assert out.startswith(b"HTTP/1.1 431 ")
    out, _ = raw(live.url, b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and b"nosniff" in out
    # the timer starts again for each request of a kept-alive connection
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):          # the whole first response (a JSON object)
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 408 ")


@pytest.mark.timeout(60)
def test_over_http_a_chunked_oversized_body_is_413_and_a_tampered_download_breaks_off(api, live, stored_model, tmp_path):
    def chunked():
        for _ in range(40):
            yield b" " * 65536
    r = httpx.post(f"{live.url}/api/v1/jobs", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "1 MiB" in r.json()["detail"]
    assert jobs_stored(api) == 1                  # the stored model's job only
    tamper(stored_model.path)
    with Client(live.url) as c, pytest.raises(DownloadError, match="broke off after .* of 2621456 bytes"):
        c.download(stored_model.id, tmp_path / "got.safetensors")
    assert list(tmp_path.glob("*got*")) == []
    # the CLI prints the error, without a traceback
    from typer.testing import CliRunner

    from api.cli import app
    result = CliRunner().invoke(app, ["download", stored_model.id, "-o", str(tmp_path / "cli.safetensors"),
                                      "--url", live.url])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert re.search(r"error: the download of model \w+ broke off", " ".join(result.output.split()))
    assert list(tmp_path.glob("*cli*")) == []


# ---------------------------------------------------------------- in a browser, under the policy

@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_the_dashboard_and_docs_work_under_the_policy_in_chromium(api, live):
    """Every page of the dashboard (with a finished job, its lineage and charts) and /docs (rendered, and
    an operation tried out): no policy violation, no console error, nothing fetched from elsewhere."""
    from playwright.sync_api import sync_playwright

    from tests.api.test_dashboard import CHROMIUM, FLAGS
    from tests.service.test_store import SPEC, feed_job
    job = api.store.create_job(SPEC)
    models = feed_job(api.store, job.id)
    api.store.claim_queued(1)
    api.store.job_succeeded(job.id, models[-1].id)
    other = api.store.create_job(SPEC)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        errors, elsewhere = [], []
        page.on("console", lambda m: m.type == "error" and "503" not in m.text and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: r.url.startswith(live.url) or r.url.startswith("data:") or elsewhere.append(r.url))
        page.add_init_script("document.addEventListener('securitypolicyviolation', "
                             "e => console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`))")
        for route, ready in [("", f'tr[data-job="{job.id}"]'), (f"#/jobs/{job.id}", "svg#lineage .node"),
                             (f"#/models/{models[-1].id}", "svg#lineage .node"), ("#/cluster", "h1"),
                             (f"#/compare?ids={job.id},{other.id}", "td .swatch")]:
            page.goto(f"{live.url}/{route}")
            page.locator(ready).first.wait_for(timeout=20_000)
            page.wait_for_timeout(700)
            assert errors == [], (route, errors)
        # the styles the page sets through the DOM took effect: a finished job's bar is full, swatches coloured
        page.goto(f"{live.url}/")
        bar = page.locator(f'tr[data-job="{job.id}"] .bar > span')
        bar.wait_for()
        assert bar.evaluate("e => getComputedStyle(e).width") == "140px"
        page.goto(f"{live.url}/#/compare?ids={job.id},{other.id}")
        page.locator("td .swatch").first.wait_for()
        assert page.locator("td .swatch").first.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(59, 111, 216)"
        # a style attribute would be refused: the policy is in force
        page.evaluate("document.body.insertAdjacentHTML('beforeend', '<i style=\"color: red\"></i>')")
        page.wait_for_timeout(300)
        assert any("style-src" in e for e in errors)
        errors.clear()
        page.goto(f"{live.url}/docs")
        page.locator(".opblock").first.wait_for(timeout=30_000)
        page.locator(".opblock-summary", has_text="/api/v1/health").first.click()
        page.locator("button.try-out__btn").first.click()
        page.locator("button.execute").first.click()
        page.locator(".live-responses-table tr.response .response-col_status").first.wait_for(timeout=10_000)
        assert page.locator(".live-responses-table tr.response .response-col_status").first.inner_text().strip() == "200"
        assert errors == [] and elsewhere == [], (errors, elsewhere)
        browser.close()


def test_stream_slots_are_counted_across_processes_and_a_dead_process_gives_its_back(tmp_path):
    """The per-user cap holds across the API processes of `ladle serve --workers N`: slots are locks on
    files, which another process holds as this one would, and which the kernel frees when it dies."""
    import subprocess
    import sys

    slots = StreamSlots(tmp_path / "streams")
    hold = slots.open("alice", 2, iter(()))                # this process: one of alice's two
    assert hold is not None
    other = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from api.hardening import StreamSlots\n"
        f"s = StreamSlots(Path({str(tmp_path / 'streams')!r}))\n"
        "held = s.open('alice', 2, iter(()))\n"          # a slot is held while its response lives
        "assert held is not None and s.open('alice', 2, iter(())) is None\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"    # it got the second, and no third
        assert slots.open("alice", 2, iter(())) is None      # so none is left for this process
        bobs = slots.open("bob", 2, iter(()))               # another user's are their own
        assert bobs is not None
    finally:
        other.kill()
        other.wait()
    again = slots.open("alice", 2, iter(()))                # its slot was given back when it died
    assert again is not None and slots.held == {"alice": 2, "bob": 1}
    del hold, again, bobs                                   # a response never sent frees its slot when collected
    gc.collect()
    assert slots.held == {} and slots.open("alice", 2, iter(())) is not None
