"""A stored model in each export format (design section 6c; the formats themselves are workers.export).

    dense    the stored checkpoint itself (safetensors: state, mask, metadata)
    sparse   ``<model uri>.sparse.safetensors``: bitmask or CSR per prunable tensor, loads back exact
    hf       ``<model uri>.hf.zip``: a Hugging Face folder, zipped (causal LMs only)
    onnx     ``<model uri>.onnx`` (image models only; not for ``import:`` archs, whose code the API
             process never imports, design section 8)

An export is built on first request from the stored dense checkpoint, as a unit of work
(workers.units.Export: the checkpoint read whole and checked against the store's sha256, the format
built, written next to it in the artifact store atomically), by a `Builder`:

- `ClusterBuilder` (the service's): a Ray job of its own, submitted through the Jobs API with the
  model's resources (its job's `cpus_per_ingredient`, and memory for a few copies of the checkpoint) so
  that Ray places it on a node that has them; the API process never loads the model. Its submission
  id names the model, the format and the try, so every API process asking for the same export joins
  the same build; a build that failed is not tried again for `RETRY_AFTER` seconds (the failure is
  the answer meanwhile), and at most `MAX_TRIES` times in all.
- `InProcessBuilder`: the same unit in this process (an API without a cluster: tests, embedding).

The API waits for a build up to a time the client chooses; a build still running then is
`ExportPending` (HTTP 202: ask again). A finished one is recorded in the model's metrics: ``sizes``
{format: bytes, "dense" included} and ``export_sha256`` {format: sha256}. Later requests get the
cached file while its size matches the record (its bytes are checked against the recorded sha256 as
they are sent). A model replaced under the same name (a new id) starts with fresh metrics, so its
exports are rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import fsspec

from workers.config import IMPORT_PREFIX, ModelError, is_causal_lm
from workers.units import Export, ExportOut

log = logging.getLogger("ladle.exports")
FORMATS = ("dense", "sparse", "hf", "onnx", "compact")
SUFFIX = {"dense": ".safetensors", "sparse": ".sparse.safetensors", "hf": ".hf.zip", "onnx": ".onnx",
          "compact": ".compact.safetensors"}
MEDIA_TYPE = {"dense": "application/octet-stream", "sparse": "application/octet-stream", "hf": "application/zip",
              "onnx": "application/octet-stream", "compact": "application/octet-stream"}


class ExportRefused(ValueError):
    """The format does not fit this model (an LLM as onnx, an image model as hf, ...): the client's mistake."""


class ExportUnavailable(RuntimeError):
    """This server cannot build the export (a package or the model's base folder is missing here)."""


class SourceDamaged(RuntimeError):
    """The stored checkpoint does not match the store's record; nothing is exported from it."""


@dataclass(frozen=True)
class ExportFile:
    """One export of a model: where it is, its size and sha256, and what to call it for a client."""
    format: str
    uri: str
    size_bytes: int
    sha256: str
    filename: str
    media_type: str


def export_uri(model_uri: str, fmt: str) -> str:
    """Where the export `fmt` of the model stored at `model_uri` is kept (the checkpoint itself for dense)."""
    return model_uri if fmt == "dense" else model_uri + SUFFIX[fmt]


def filename(model, fmt: str) -> str:
    return f"{model.name.replace('/', '-')}-{model.id[:8]}{SUFFIX[fmt]}"


def check_format(fmt: str, arch: Any, structure: Any = "unstructured") -> None:
    """ExportRefused unless `fmt` is a format and fits a model of `arch` (the job spec's model.arch) pruned
    with `structure` (its prune.structure)."""
    if fmt not in FORMATS:
        raise ExportRefused(f"unknown export format {fmt!r}; the formats are {', '.join(FORMATS)}")
    llm = is_causal_lm(arch)
    if fmt == "compact" and (llm or structure != "channels"):
        raise ExportRefused("the compact format is an image model pruned with prune.structure channels, its removed "
                            "channels taken out; " + ("a language model's is hf" if llm else
                                                      "this model keeps its shapes: use dense, sparse or onnx"))
    if fmt == "compact" and isinstance(arch, str) and arch.startswith(IMPORT_PREFIX):
        raise ExportRefused(f"the compact format needs the model's code, and the API never imports a module a job "
                            f"names ({arch!r}); use dense or sparse")
    if fmt == "hf" and not llm:
        raise ExportRefused(f"the hf format is for causal language models (arch hf:<dir>); this model's arch is "
                            f"{arch!r}: use dense, sparse or onnx")
    if fmt == "onnx" and llm:
        raise ExportRefused(f"the onnx format is for image models; this model is a causal language model ({arch!r}): "
                            f"use dense, sparse or hf")
    if fmt == "onnx" and isinstance(arch, str) and arch.startswith(IMPORT_PREFIX):
        raise ExportRefused(f"the onnx format needs the model's code, and the API never imports a module a job names "
                            f"({arch!r}); use dense or sparse")


def cached(model, fmt: str) -> ExportFile | None:
    """The recorded export `fmt` of `model` if its file is there with the recorded size."""
    metrics = model.metrics or {}
    size, sha = (metrics.get("sizes") or {}).get(fmt), (metrics.get("export_sha256") or {}).get(fmt)
    if not isinstance(size, int) or not isinstance(sha, str):
        return None
    uri = export_uri(model.uri, fmt)
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        if fs.size(path) != size:
            return None
    except (FileNotFoundError, OSError):
        return None
    return ExportFile(fmt, uri, size, sha, filename(model, fmt), MEDIA_TYPE[fmt])


class ExportPending(RuntimeError):
    """The export is being built and was not done within the wait: ask again (HTTP 202)."""

    def __init__(self, message: str, *, state: str, seconds: float):
        super().__init__(message)
        self.state, self.seconds = state, seconds


# --------------------------------------------------------------------------- one build, where it runs

def export_step(model, fmt: str) -> Export:
    """The unit of work that builds the export `fmt` of the stored `model` (a store row)."""
    return Export(name=f"model {model.id}'s checkpoint", model_uri=model.uri, size_bytes=model.size_bytes,
                  sha256=model.sha256, fmt=fmt, out_uri=export_uri(model.uri, fmt))


def run_here(step: Export) -> ExportOut:
    """Run `step` in this process (a Ray job's entrypoint, or an API without a cluster), its failures
    as ExportRefused, ExportUnavailable or SourceDamaged with a message for the client."""
    from workers.checkpoint import CheckpointError
    from workers.export import ExportError
    model = step.name.removesuffix("'s checkpoint")
    try:
        return step.run()
    except CheckpointError as e:
        raise SourceDamaged(str(e)) from e
    except ExportError as e:
        raise ExportRefused(str(e)) from e
    except ModelError as e:                 # the model's base (an hf: folder, a torchvision name) is not here
        raise ExportUnavailable(f"{model} cannot be rebuilt for the {step.fmt} export: {e}") from e
    except ImportError as e:
        raise ExportUnavailable(str(e)) from e
    except OSError as e:
        raise ExportUnavailable(f"the {step.fmt} export of {model} cannot be written to the artifact store "
                                f"({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001 - an exporter's own failure (torch.onnx, transformers): said, not a trace
        log.exception("%s: the %s export failed", model, step.fmt)
        raise ExportUnavailable(f"the {step.fmt} export of {model} failed ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class Resources:
    """What an export asks of the cluster: CPUs (its job's `cpus_per_ingredient`) and memory in bytes."""
    cpus: float = 1.0
    memory: int = 0


# An export holds the checkpoint's bytes, its tensors, the rebuilt model and the output at once, beside the
# interpreter with torch (and transformers for hf) loaded
EXPORT_COPIES = 4
EXPORT_BASE_BYTES = 1 << 30


def resources_for(model, spec: dict | None) -> Resources:
    """What building an export of `model` (a store row of a job with `spec`) asks of the cluster."""
    cpus = ((spec or {}).get("resources") or {}).get("cpus_per_ingredient") or 1.0
    return Resources(cpus=float(cpus), memory=EXPORT_BASE_BYTES + EXPORT_COPIES * int(model.size_bytes))


class Builder(Protocol):
    """Builds an export: returns its outcome, or raises ExportPending when it is not done within `wait`
    seconds, or ExportRefused / ExportUnavailable / SourceDamaged."""
    where: str

    def build(self, step: Export, resources: Resources, wait: float) -> ExportOut: ...


class InProcessBuilder:
    """Exports built in this process (an API without a cluster), one at a time: torch's ONNX exporter keeps
    process-wide state, so two at once would fail each other. `wait` is not used: the build is done when
    this returns."""
    where = "this process"

    def __init__(self):
        self._one = threading.Lock()

    def build(self, step: Export, resources: Resources, wait: float) -> ExportOut:
        with self._one:
            return run_here(step)


RESULT_MARK = "LADLE-EXPORT-RESULT "     # the line an export's Ray job prints last: its outcome as JSON
FAILURES: dict[str, type[Exception]] = {"refused": ExportRefused, "unavailable": ExportUnavailable,
                                        "damaged": SourceDamaged}
RETRY_AFTER = 60.0       # seconds a failed build stays the answer before a new try
MAX_TRIES = 10


def outcome_line(outcome: ExportOut | Exception) -> str:
    """What an export's Ray job prints as its last line (service.export_job)."""
    if isinstance(outcome, ExportOut):
        return RESULT_MARK + json.dumps({"ok": True, **asdict(outcome)})
    kind = next((k for k, cls in FAILURES.items() if isinstance(outcome, cls)), "unavailable")
    return RESULT_MARK + json.dumps({"ok": False, "kind": kind, "message": str(outcome)})


def read_outcome(logs: str) -> ExportOut | Exception | None:
    """The outcome in an export job's logs (its last result line), or None if it printed none."""
    line = next((ln for ln in reversed(logs.splitlines()) if ln.startswith(RESULT_MARK)), None)
    if line is None:
        return None
    try:
        got = json.loads(line[len(RESULT_MARK):])
        if got.pop("ok"):
            return ExportOut(**got)
        return FAILURES.get(got["kind"], ExportUnavailable)(got["message"])
    except (ValueError, KeyError, TypeError):
        return None


def submission_id(step: Export, attempt: int) -> str:
    """The Ray submission id of try `attempt` at building `step`: the same in every API process."""
    key = hashlib.sha256(f"{step.model_uri}\n{step.sha256}\n{step.fmt}".encode()).hexdigest()[:16]
    return f"ladle-export-{step.fmt}-{key}-{attempt}"


class ClusterBuilder:
    """Exports built as Ray jobs of their own (see the module's doc). `url()`: the Jobs API's address now;
    `nodes()`: the cluster's nodes' resources (None: unknown); `env`: what the job's process needs to
    reach the artifact store (service.dispatcher.artifacts_env)."""
    where = "the cluster"

    def __init__(self, url: Callable[[], str], env: dict[str, str], *,
                 nodes: Callable[[], list[dict[str, float]] | None] = lambda: None, poll: float = 0.25):
        self.url, self.env, self.nodes, self.poll = url, env, nodes, poll
        self._client: tuple[str, Any] | None = None
        self._lock = threading.Lock()

    def client(self):
        from ray.job_submission import JobSubmissionClient
        url = self.url()
        with self._lock:
            if self._client is None or self._client[0] != url:
                self._client = (url, JobSubmissionClient(url))
            return self._client[1]

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()` against Ray's Jobs API: None for a 404; an outage is ExportUnavailable."""
        from service.dispatcher import _status_code
        try:
            return fn()
        except RuntimeError as e:
            if _status_code(e) == 404:
                return None
            raise ExportUnavailable(f"Ray's Jobs API refused to {what} ({e})") from e
        except Exception as e:  # noqa: BLE001 - connection refused, a timeout: the cluster is not there now
            with self._lock:
                self._client = None
            raise ExportUnavailable(f"the cluster that builds exports does not answer ({type(e).__name__}); "
                                    f"try again later") from e

    def _submit(self, sid: str, step: Export, resources: Resources) -> None:
        from service.cluster import unfit
        why = unfit(resources.cpus, 0.0, self.nodes(), resources.memory)
        if why is not None:
            raise ExportUnavailable(f"the {step.fmt} export cannot be built: {why.replace('a worker of this job', 'it')}")
        entrypoint = f"{shlex.quote(sys.executable)} -m service.export_job {shlex.quote(json.dumps(asdict(step)))}"

        def submit():
            try:
                self.client().submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env={"env_vars": self.env},
                                         entrypoint_num_cpus=resources.cpus, entrypoint_memory=resources.memory,
                                         metadata={"ladle_export": step.fmt, "model_uri": step.model_uri[-200:]})
            except RuntimeError as e:
                if "already exists" not in str(e):       # another API process submitted it first: joined
                    raise
            return True
        self._call("start the export", submit)
        log.info("the %s export of %s: Ray job %s submitted (%g CPUs, %.1f GiB)", step.fmt, step.name, sid,
                 resources.cpus, resources.memory / 2**30)

    def build(self, step: Export, resources: Resources, wait: float) -> ExportOut:
        deadline = time.monotonic() + wait
        last: Exception | None = None
        for attempt in range(1, MAX_TRIES + 1):
            sid = submission_id(step, attempt)
            info = self._call("read an export's state", lambda: self.client().get_job_info(sid))
            if info is None:
                self._submit(sid, step, resources)
            elif info.status in ("FAILED", "STOPPED"):
                ended = (info.end_time or 0) / 1000
                if time.time() - ended > RETRY_AFTER:       # an old failure: try again
                    last = self._outcome(sid, info) if info.status == "FAILED" else None
                    continue
            outcome = self._wait(sid, step, deadline)
            if outcome is not None:
                return outcome
        raise ExportUnavailable(f"the {step.fmt} export of {step.name.removesuffix(chr(39) + 's checkpoint')} "
                                f"failed {MAX_TRIES} times; the last: {last}")

    def _wait(self, sid: str, step: Export, deadline: float) -> ExportOut | None:
        """The outcome of submission `sid`: its ExportOut, its failure raised, ExportPending at the
        deadline; None when it succeeded but its file is gone (the next try builds it again)."""
        while True:
            info = self._call("read an export's state", lambda: self.client().get_job_info(sid))
            status = "PENDING" if info is None else str(info.status)
            if status == "SUCCEEDED":
                out = self._outcome(sid, info)
                if isinstance(out, ExportOut) and _size(step.out_uri) == out.size_bytes:
                    return out
                return None
            if status in ("FAILED", "STOPPED"):
                out = self._outcome(sid, info)
                raise out if isinstance(out, Exception) else ExportUnavailable(
                    f"the {step.fmt} export's Ray job {sid} ended {status.lower()}: {getattr(info, 'message', '')}")
            if time.monotonic() >= deadline:
                started = (getattr(info, "start_time", None) or 0) / 1000
                seconds = max(0.0, time.time() - started) if started else 0.0
                raise ExportPending(f"the {step.fmt} export of {step.name.removesuffix(chr(39) + 's checkpoint')} "
                                    f"is being built on the cluster (Ray job {sid}: {status.lower()} for "
                                    f"{seconds:.0f} s); ask again", state=status.lower(), seconds=seconds)
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))

    def _outcome(self, sid: str, info) -> ExportOut | Exception | None:
        logs = self._call("read an export's logs", lambda: self.client().get_job_logs(sid)) or ""
        out = read_outcome(logs)
        if out is None and str(info.status) == "FAILED":
            tail = (getattr(info, "message", "") or "").strip().splitlines()[-1:] or [""]
            return ExportUnavailable(f"the export's Ray job {sid} failed: {tail[0][:500]}")
        return out


def _size(uri: str) -> int | None:
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        return fs.size(path)
    except (FileNotFoundError, OSError):
        return None


_locks: dict[str, threading.Lock] = {}         # "<model id>/<format>": its build in this process
_locks_guard = threading.Lock()


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def ensure(store, model, fmt: str, spec: dict | None, builder: Builder, *, wait: float = 30.0) -> ExportFile:
    """The export `fmt` of the stored `model` (a store row) of a job whose spec is `spec`: the cached
    file, or one `builder` builds now (waiting up to `wait` seconds: ExportPending after that), recorded
    in the model's metrics. Blocking: call it off the event loop. ExportRefused, ExportUnavailable,
    SourceDamaged, ExportPending."""
    arch = ((spec or {}).get("model") or {}).get("arch")
    prune = (spec or {}).get("prune")
    check_format(fmt, arch, prune.get("structure", "unstructured") if isinstance(prune, dict) else "unstructured")
    if fmt == "dense":
        return ExportFile(fmt, model.uri, model.size_bytes, model.sha256, filename(model, fmt), MEDIA_TYPE[fmt])
    with _lock(f"{model.id}/{fmt}"):            # one build of an export at a time in this process
        model = store.get_model(model.id) or model
        hit = cached(model, fmt)
        if hit is not None:
            return hit
        out = builder.build(export_step(model, fmt), resources_for(model, spec), wait)
        log.info("model %s: the %s export built on %s (%d bytes, %.1f s, peak RSS %.0f MB)", model.id, fmt,
                 builder.where, out.size_bytes, out.seconds, out.peak_rss_bytes / 2**20)
        model = store.get_model(model.id) or model
        metrics = model.metrics or {}
        store.add_model_metrics(model.id, sizes={**(metrics.get("sizes") or {}), "dense": model.size_bytes,
                                                 fmt: out.size_bytes},
                                export_sha256={**(metrics.get("export_sha256") or {}), fmt: out.sha256})
        return ExportFile(fmt, export_uri(model.uri, fmt), out.size_bytes, out.sha256, filename(model, fmt),
                          MEDIA_TYPE[fmt])
