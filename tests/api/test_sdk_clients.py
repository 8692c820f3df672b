"""The SDK over any httpx-compatible client: the same calls (follow a job to its end, download and export
streamed with their checksums, upload a checkpoint streamed, list and delete it) over an `httpx.Client`, an
`httpx2.Client` (Pydantic's fork, which huggingface_hub pulls in) and Starlette's TestClient (which uses
httpx2 where it is installed), against one live server on loopback (a temp SQLite store, no Ray: jobs are
stored, and made to end through the store). A library that is not installed is skipped; httpx always is."""

import importlib
import threading
import time

import pytest

from api.client import TRANSPORT_ERRORS, Client, InvalidSpec
from api.server import BackgroundServer
from tests.api.conftest import NO_RAY, stored_only_server
from tests.api.test_export import IMAGE_JOB, stored_cnn
from workers.checkpoint import load
from workers.export import from_sparse_bytes

LIBRARIES = ["httpx", "httpx2", "testclient"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with stored_only_server(tmp_path_factory.mktemp("sdk")) as srv:
        yield srv


def http_client(library: str, server: BackgroundServer):
    """A client of `library` whose base URL is the server's /api/v1; skipped where it is not installed."""
    base = f"{server.url}/api/v1"
    if library == "testclient":
        from fastapi.testclient import TestClient
        return TestClient(server.server.config.app, base_url=base.replace("127.0.0.1", "localhost"))
    lib = pytest.importorskip(library)
    return lib.Client(base_url=base, timeout=30)


@pytest.fixture(params=LIBRARIES)
def sdk(request, server):
    with Client(http=http_client(request.param, server)) as c:
        yield c


def test_the_sdk_follows_downloads_exports_and_uploads_over_any_client(sdk, server, tmp_path):
    job = sdk.submit(dict(IMAGE_JOB, name=f"over-{type(sdk.http).__module__}"))

    def run_it():                                   # what a driver would record, step by step
        time.sleep(0.2)
        server.store.claim_queued(1)
        for i in range(3):
            server.store.event(job["id"], f"step {i}")
            time.sleep(0.05)
        server.store.job_failed(job["id"], "the end")
    worker = threading.Thread(target=run_it)
    worker.start()
    seen = [e["message"] for u in sdk.follow(job["id"], poll=0.05, timeout=30) for e in u.events]
    worker.join()
    assert seen == ["step 0", "step 1", "step 2", "job failed: the end"]        # each once, in order
    assert sdk.job(job["id"])["status"] == "failed"

    rec = stored_cnn(server, job["id"])
    dense = sdk.download(rec.id, tmp_path / "soup.safetensors")               # streamed, checked, atomic
    assert load(dense).meta["model_id"] == rec.id
    sparse = sdk.export(rec.id, "sparse", tmp_path / "soup.sparse.safetensors")   # the export's own timeout
    assert from_sparse_bytes(sparse.read_bytes()).meta["model_id"] == rec.id
    with pytest.raises(InvalidSpec, match="format: the hf format is for causal language models"):
        sdk.export(rec.id, "hf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup.safetensors", "soup.sparse.safetensors"]

    up = sdk.upload(dense, "checkpoint")                                       # a streamed request body
    assert up["ref"] == f"upload:{up['id']}" and up["size_bytes"] == dense.stat().st_size
    assert up["id"] in [u["id"] for u in sdk.uploads()["data"]]
    sdk.delete_upload(up["id"])
    assert up["id"] not in [u["id"] for u in sdk.uploads()["data"]]


@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_a_server_that_is_not_there_is_a_transport_error_the_cli_names(library):
    """`ladle` turns TRANSPORT_ERRORS into "cannot reach the Ladle server"; a client of either library
    raises one of them."""
    lib = pytest.importorskip(library)
    with Client(http=lib.Client(base_url=f"{NO_RAY}/api/v1", timeout=5)) as c, pytest.raises(TRANSPORT_ERRORS):
        c.health()


def test_every_installed_library_is_covered():
    """httpx is a dependency, so at least one library runs the SDK's calls; httpx2 too where it is installed."""
    installed = [name for name in ("httpx", "httpx2") if importlib.util.find_spec(name) is not None]
    assert "httpx" in installed
    import api.client
    assert len(api.client.TRANSPORT_ERRORS) == len(installed)
