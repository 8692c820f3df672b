"""The Python SDK: a small client for the Ladle REST API over any httpx-compatible HTTP client.

    from api.client import Client
    c = Client("http://127.0.0.1:8000", token=None)
    c = Client(http=my_client)            # or over a client of yours: httpx.Client, httpx2.Client, TestClient
    job = c.submit("job.yaml")            # a JobSpec, a dict, or a YAML/JSON file
    job = c.wait(job["id"])               # with a progress bar
    for events, job in c.follow(job["id"]): ...   # or its new events and latest state, until it ends
    c.phases(job["id"]); c.lineage(job["final_model_id"]); c.download(job["final_model_id"], "soup.safetensors")
    c.export(job["final_model_id"], "sparse", "soup.sparse.safetensors")   # or "hf" (a folder), "onnx"
    c.compare([job["id"], other_id])      # [{job, phases}, ...]: several jobs side by side

Errors from the server surface as typed exceptions carrying its message; a download that breaks off
or does not match the server's checksum raises DownloadError. The SDK builds no library-specific object
for the client it wraps (timeouts are plain numbers and tuples), so httpx and httpx2 (Pydantic's fork,
which Starlette's TestClient uses where it is installed) serve alike; TRANSPORT_ERRORS catches either's.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import yaml


def _transport_errors() -> tuple[type[Exception], ...]:
    """The TransportError of httpx and, where it is installed, of httpx2: a client of either raises its own."""
    errors: list[type[Exception]] = [httpx.TransportError]
    try:
        import httpx2
    except ImportError:
        pass
    else:
        errors.append(httpx2.TransportError)
    return tuple(errors)


TRANSPORT_ERRORS = _transport_errors()


class LadleError(Exception):
    """The server refused a request; `status` is the HTTP status, `detail` its message."""

    def __init__(self, status: int, detail: Any):
        self.status, self.detail = status, detail
        super().__init__(f"{status}: {self.message}")

    @property
    def message(self) -> str:
        if isinstance(self.detail, list):      # FastAPI validation errors
            return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}"
                             for e in self.detail)
        return str(self.detail)


class Unauthorized(LadleError): ...
class NotFound(LadleError): ...
class Conflict(LadleError): ...
class InvalidSpec(LadleError): ...
class LimitReached(LadleError):
    """A limit of the service: a body or the caller's uploads too large (413), too many jobs queued or
    running, or event streams open (429); the message names the limit."""


ERRORS = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 413: LimitReached, 422: InvalidSpec,
          429: LimitReached}


class DownloadError(Exception):
    """A download that did not arrive whole and intact; nothing was written to its path."""


class ChecksumMismatch(DownloadError):
    """The bytes received do not have the sha256 the server announced (X-Checksum-Sha256)."""


EXPORT_FORMATS = ("dense", "sparse", "hf", "onnx", "compact")
EXPORT_WAIT = 30.0       # seconds the server is asked to wait for an export being built before it answers 202
EXPORT_TIMEOUT = 3600.0  # seconds Client.export waits in all for an export to be built
EXPORT_SUFFIX = {"dense": ".safetensors", "sparse": ".sparse.safetensors", "hf": ".hf.zip", "onnx": ".onnx",
                 "compact": ".compact.safetensors"}


def unpack_zip(archive: str | Path, folder: str | Path) -> Path:
    """Unpack a zip archive (the hf export) into `folder`, atomically (a temporary folder beside it, renamed);
    an archive with a member outside the folder (absolute, or through ..) raises DownloadError and leaves
    nothing."""
    import shutil
    import tempfile
    import zipfile
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                target = (tmp / name).resolve()
                if name.startswith("/") or not target.is_relative_to(tmp.resolve()):
                    raise DownloadError(f"the archive {archive} has a member outside its folder: {name!r}")
            z.extractall(tmp)
        if folder.exists():
            folder.rmdir()                        # empty (checked by the caller)
        tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


class Update(NamedTuple):
    """One look at a followed job: the events that arrived since the last look, oldest first, and the job
    as GET /jobs/{id} shows it."""
    events: list[dict]
    job: dict


def follow(read_job: Callable[[], dict], read_events: Callable[[int], list[dict]], *, after: int = 0,
           poll: float = 0.5, timeout: float | None = None) -> Iterator[Update]:
    """Poll a job until it has ended, yielding an Update each `poll` seconds; the last one has
    job["finished"] true. `read_job()` gives the job as the API shows it, `read_events(after)` a page of
    its events with ids above `after`: the HTTP API (Client.follow) or an in-process store (`ladle run`).
    The job is read before its events, so the events of a job seen ended are all in the last Update.
    TimeoutError when it still runs after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = read_job()
        events = []
        while page := read_events(after):           # every page: a backlog comes in one Update
            events += page
            after = page[-1]["id"]
        yield Update(events, job)
        if job["finished"]:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job['id']} still {job['status']} after {timeout} s")
        time.sleep(poll)


class Client:
    """The REST API at `url` with a bearer `token`, over a new httpx.Client; or over `http`, any
    httpx-compatible client of yours (httpx or httpx2 Client, Starlette's TestClient) whose base URL ends
    in /api/v1 and which carries its own headers (the token) and timeout; `url`, `token` and `timeout`
    are then unused."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, *, timeout: float = 30.0,
                 http: Any = None):
        if http is None:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)
        self.http = http

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ERRORS.get(r.status_code, LadleError)(r.status_code, detail)
        return r

    def _get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    # -- jobs
    def submit(self, spec: Any, *, idempotency_key: str | None = None) -> dict:
        """Submit a JobSpec, a dict or a YAML/JSON file path; returns the queued job."""
        if isinstance(spec, (str, Path)):
            spec = yaml.safe_load(Path(spec).read_text()) or {}
        elif hasattr(spec, "model_dump"):
            spec = spec.model_dump(mode="json")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/jobs", json=spec, headers=headers).json()

    def job(self, job_id: str) -> dict:
        return self._get(f"/jobs/{job_id}")

    def jobs(self, *, status: str | None = None, limit: int = 50, offset: int = 0, include_spec: bool = False) -> dict:
        """A page of jobs `{data, count}`, newest first; each job's `spec` is null unless include_spec."""
        return self._get("/jobs", status=status, limit=limit, offset=offset, include_spec=include_spec or None)

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def phases(self, job_id: str) -> list[dict]:
        return self.phase_page(job_id)["data"]

    def phase_page(self, job_id: str) -> dict:
        """GET /jobs/{id}/phases whole: `data` (the phases) and `columns` (their metrics: key, template, label,
        unit), so that a caller finds a metric's key whatever the job's metric (`soup_{m}` -> `soup_accuracy`)."""
        return self._get(f"/jobs/{job_id}/phases")

    def runs(self, job_id: str, kind: str | None = None) -> list[dict]:
        return self._get(f"/jobs/{job_id}/runs", kind=kind)["data"]

    def search(self, job_id: str) -> list[dict]:
        """The schedule-search trials of every searched phase (GET /jobs/{id}/search): per trial its
        phase, index, config, the values the search drew (`searched`), epochs run, last validation
        metrics, whether ASHA stopped it early and whether it won (`chosen`)."""
        return self._get(f"/jobs/{job_id}/search")["data"]

    def compare(self, job_ids: list[str]) -> list[dict]:
        """Several jobs side by side, in the order given: per job `{job, phases}` (GET /jobs/{id} and
        /jobs/{id}/phases). An id that is not a job (or not yours) raises NotFound naming it."""
        out = []
        for job_id in job_ids:
            if not re.fullmatch(r"[\w-]+", job_id):       # "", "a/b", "?x" would reach another route
                raise NotFound(404, f"job {job_id!r} not found")
            out.append({"job": self.job(job_id), "phases": self.phases(job_id)})   # its 404 names the id
        return out

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        return self._get(f"/jobs/{job_id}/events", after=after)["data"]

    def metrics(self, job_id: str, *, run: str | None = None, name: str | None = None, frame: bool = False):
        """Metric rows (run, step, epoch, name, value, time); a pandas DataFrame with frame=True."""
        rows = self._get(f"/jobs/{job_id}/metrics", run=run, name=name)["data"]
        if frame:
            import pandas as pd
            return pd.DataFrame(rows)
        return rows

    def follow(self, job_id: str, *, after: int = 0, poll: float = 0.5,
               timeout: float | None = None) -> Iterator[Update]:
        """Follow a job until it has ended (its `finished` field): each `poll` seconds, an Update with the
        events newer than the event id `after` that arrived since the last one, and the job. The last
        Update has the ended job and all its remaining events. TimeoutError after `timeout` seconds.

            for events, job in c.follow(job_id):
                ...
        """
        return follow(lambda: self.job(job_id), lambda last: self.events(job_id, after=last),
                      after=after, poll=poll, timeout=timeout)

    def wait(self, job_id: str, *, progress: bool = True, poll: float = 1.0, timeout: float | None = None,
             on_event=None) -> dict:
        """Wait until the job ends, with a progress bar (phase and epochs done); `on_event` is called
        with each event as it arrives. Returns the job."""
        from tqdm import tqdm
        with tqdm(total=100, unit="%", disable=not progress, bar_format="{desc} {bar} {n:.0f}% [{elapsed}]") as bar:
            for events, job in self.follow(job_id, poll=poll, timeout=timeout):
                if on_event is not None:
                    for e in events:
                        on_event(e)
                phase = "" if job["current_phase"] is None else f" phase {job['current_phase']}"
                bar.set_description_str(f"{job['name']} {job['status']}{phase}")
                bar.n = round(100 * job["progress"], 1)
                bar.refresh()
        return job

    # -- models
    def model(self, model_id: str) -> dict:
        return self._get(f"/models/{model_id}")

    def lineage(self, model_id: str) -> dict:
        return self._get(f"/models/{model_id}/lineage")

    def robustness(self, model_id: str) -> dict:
        """A dense model's one-shot robustness curve: `{model_id, metric, split, dense_accuracy, points, detail}`."""
        return self._get(f"/models/{model_id}/robustness")

    # -- uploads
    def upload(self, path: str | Path, kind: str, *, filename: str | None = None) -> dict:
        """Send a checkpoint (kind "checkpoint": a .safetensors file from `download`) or a dataset file
        ("dataset": .npz, or .txt for a text dataset), streamed; returns the upload, whose `ref`
        (upload:<id>) a spec names as model.checkpoint or data.path."""
        path = Path(path)

        def chunks():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
        return self._request("POST", "/uploads", params={"kind": kind, "filename": filename or path.name},
                             content=chunks(), headers={"Content-Type": "application/octet-stream",
                                                        "Content-Length": str(path.stat().st_size)}).json()

    def uploads(self, *, limit: int = 100, offset: int = 0) -> dict:
        """Your uploads `{data, count}`, newest first."""
        return self._get("/uploads", limit=limit, offset=offset)

    def delete_upload(self, upload_id: str) -> dict:
        return self._request("DELETE", f"/uploads/{upload_id}").json()

    def download(self, model_id: str, path: str | Path) -> Path:
        """Save the model's checkpoint (safetensors) to `path`, atomically, once its bytes match the sha256
        the server sends (X-Checksum-Sha256). ChecksumMismatch when they do not, DownloadError when the
        transfer breaks off (the server breaks it off when its stored file does not match); either way
        nothing is left at `path` or beside it."""
        return self._fetch(model_id, "dense", Path(path))

    def export(self, model_id: str, format: str = "sparse", path: str | Path | None = None, *,
               on_progress: Callable[[dict], None] | None = None, timeout: float = EXPORT_TIMEOUT) -> Path:
        """Save the model in an export format (GET /models/{id}/download?format=...), checked like `download`:

        - ``dense``: the checkpoint as stored (safetensors: state, mask, metadata);
        - ``sparse``: safetensors with a bitmask or CSR per pruned tensor; ``workers.export.from_sparse_bytes``
          loads it back into the same state and masks;
        - ``hf``: a Hugging Face folder (causal LMs), sent as a zip and unpacked into the folder `path` (which
          must not exist or be empty); ``AutoModelForCausalLM.from_pretrained(path)`` loads it;
        - ``onnx``: an ONNX file (image models; input ``input`` (batch, C, H, W), output ``logits``).

        `path` defaults to ``<model_id>.sparse.safetensors`` (``.onnx``, ``.safetensors``; the folder
        ``<model_id>.hf``) in the current folder.
        An export not built yet is built on the cluster first: while it is, the server answers 202 with its
        state every EXPORT_WAIT seconds, passed to `on_progress` ({detail, state, seconds}); after `timeout`
        seconds a LadleError says it is still being built (the build goes on; ask again later).
        A format that does not fit the model raises InvalidSpec (422) with the server's reason."""
        if path is None:
            path = Path(f"{model_id}{EXPORT_SUFFIX.get(format, '')}".removesuffix(".zip"))
        path = Path(path)
        if format != "hf":
            return self._fetch(model_id, format, path, on_progress, timeout)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not an empty folder; the hf export unpacks into a new folder")
        archive = path.with_name(f".{path.name}.zip")
        self._fetch(model_id, format, archive, on_progress, timeout)
        try:
            unpack_zip(archive, path)
        finally:
            archive.unlink(missing_ok=True)
        return path

    def _fetch(self, model_id: str, format: str, path: Path, on_progress: Callable[[dict], None] | None = None,
               timeout: float = EXPORT_TIMEOUT) -> Path:
        """GET the model's download in `format` into `path`, atomically, once it matches X-Checksum-Sha256;
        while the server answers 202 (an export being built), ask again until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            done = self._fetch_once(model_id, format, path)
            if isinstance(done, Path):
                return done
            if on_progress is not None:
                on_progress(done)
            if time.monotonic() >= deadline:
                raise LadleError(202, f"{done.get('detail', 'the export is being built')}; still not done after "
                                      f"{timeout:.0f} s")
            time.sleep(1.0)

    def _fetch_once(self, model_id: str, format: str, path: Path) -> Path | dict:
        """One GET of the download: the file written to `path`, or the 202 body of an export being built."""
        tmp = path.with_name(f".{path.name}.part")
        digest, size, started = hashlib.sha256(), 0, False
        params = {} if format == "dense" else {"format": format, "wait": EXPORT_WAIT}
        what = f"model {model_id}" if format == "dense" else f"the {format} export of model {model_id}"
        # the server holds the answer up to EXPORT_WAIT seconds while an export is built. The timeout as a plain
        # (connect, read, write, pool) tuple: every httpx-compatible client takes one
        t = self.http.timeout
        kw = {} if format == "dense" else {"timeout": (t.connect, EXPORT_WAIT + 60.0, t.write, t.pool)}
        try:
            with self.http.stream("GET", f"/models/{model_id}/download", params=params, **kw) as r:
                if r.status_code == 202:
                    r.read()
                    return r.json()
                if r.status_code >= 400:
                    r.read()
                    try:
                        detail = r.json().get("detail", r.text)
                    except ValueError:
                        detail = r.text
                    raise ERRORS.get(r.status_code, LadleError)(r.status_code, detail)
                started, expected = True, r.headers.get("X-Checksum-Sha256")
                length = r.headers.get("Content-Length")
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes():
                        digest.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
        except TRANSPORT_ERRORS as e:
            tmp.unlink(missing_ok=True)
            if not started:
                raise
            raise DownloadError(f"the download of {what} broke off after {size} of {length or '?'} bytes "
                                f"({e}); the server may have found its stored file damaged") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if expected is None or digest.hexdigest() != expected.lower():
            tmp.unlink(missing_ok=True)
            if expected is None:
                raise DownloadError(f"the server sent {what} without its checksum (X-Checksum-Sha256)")
            raise ChecksumMismatch(f"the download of {what} is damaged: {size} bytes with sha256 "
                                   f"{digest.hexdigest()}, but the server's checksum is {expected}; nothing was "
                                   f"written to {path}")
        tmp.replace(path)
        return path

    def health(self) -> dict:
        return self._get("/health")

    def cluster(self) -> dict:
        return self._get("/cluster")
