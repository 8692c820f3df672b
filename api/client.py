"""The Python SDK: a small httpx client for the Ladle REST API.

    from api.client import Client
    c = Client("http://127.0.0.1:8000", token=None)
    job = c.submit("job.yaml")            # a JobSpec, a dict, or a YAML/JSON file
    job = c.wait(job["id"])               # with a progress bar
    c.phases(job["id"]); c.lineage(job["final_model_id"]); c.download(job["final_model_id"], "soup.safetensors")
    c.compare([job["id"], other_id])      # [{job, phases}, ...]: several jobs side by side

Errors from the server surface as typed exceptions carrying its message.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

TERMINAL = ("succeeded", "failed", "cancelled")


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


ERRORS = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 422: InvalidSpec}


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, *, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
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

    def jobs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        return self._get("/jobs", status=status, limit=limit, offset=offset)

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def phases(self, job_id: str) -> list[dict]:
        return self._get(f"/jobs/{job_id}/phases")["data"]

    def runs(self, job_id: str, kind: str | None = None) -> list[dict]:
        return self._get(f"/jobs/{job_id}/runs", kind=kind)["data"]

    def search(self, job_id: str) -> list[dict]:
        """The schedule-search trials of every searched phase: one row each with its phase, trial,
        searched values, epochs run, last metrics, whether ASHA stopped it early and whether it won."""
        rows = []
        for r in self.runs(job_id, kind="search_trial"):
            m = r["metrics"]
            rows.append({"phase": r["phase"], "trial": r["name"].rsplit("/", 1)[-1], **r["config"].get("search", {}),
                         "epochs_run": m.get("epochs_run"), "val_accuracy": m.get("val_accuracy"),
                         "val_loss": m.get("val_loss"), "stopped_early": m.get("stopped_early"),
                         "chosen": m.get("chosen"), "status": r["status"]})
        return rows

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

    def wait(self, job_id: str, *, progress: bool = True, poll: float = 1.0, timeout: float | None = None,
             on_event=None) -> dict:
        """Wait until the job ends, with a progress bar (phase and epochs done); returns the job."""
        from tqdm import tqdm
        deadline = None if timeout is None else time.monotonic() + timeout
        last_event = 0
        with tqdm(total=100, unit="%", disable=not progress, bar_format="{desc} {bar} {n:.0f}% [{elapsed}]") as bar:
            while True:
                job = self.job(job_id)
                if on_event is not None:
                    for e in self.events(job_id, after=last_event):
                        last_event = e["id"]
                        on_event(e)
                phase = "" if job["current_phase"] is None else f" phase {job['current_phase']}"
                bar.set_description_str(f"{job['name']} {job['status']}{phase}")
                bar.n = round(100 * job["progress"], 1)
                bar.refresh()
                if job["status"] in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
                time.sleep(poll)

    # -- models
    def model(self, model_id: str) -> dict:
        return self._get(f"/models/{model_id}")

    def lineage(self, model_id: str) -> dict:
        return self._get(f"/models/{model_id}/lineage")

    def download(self, model_id: str, path: str | Path) -> Path:
        """Save the model's checkpoint (safetensors) to `path`, atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        with self.http.stream("GET", f"/models/{model_id}/download") as r:
            if r.status_code >= 400:
                r.read()
                raise ERRORS.get(r.status_code, LadleError)(r.status_code, r.json().get("detail", r.text))
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        tmp.replace(path)
        return path

    def health(self) -> dict:
        return self._get("/health")

    def cluster(self) -> dict:
        return self._get("/cluster")
