"""Uploads (issue 15, design section 8): a user sends a checkpoint or a dataset file through the API (streamed
to the artifact store, size-capped, checked, owned by the user) and names it in a spec as upload:<id>; a job
then trains from it. Other users' uploads look like missing ones; a refused or broken upload leaves nothing."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from service.artifacts import ArtifactStore
from service.driver import stored_spec
from service.executors import SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import LocalRecorder
from tests.api.test_web_hardening import sdk
from workers.checkpoint import Checkpoint, load, to_bytes
from workers.models import build_model

TOKENS = {}


def bearer(api_auth, name: str) -> dict:
    if name not in TOKENS.setdefault(id(api_auth), {}):
        _, secret = api_auth.store.create_token(name, admin=name == "root")
        TOKENS[id(api_auth)][name] = secret
    return {"Authorization": f"Bearer {TOKENS[id(api_auth)][name]}"}


def checkpoint_bytes() -> bytes:
    """A Ladle checkpoint of an (untrained) mlp for digits, as `ladle download` would give."""
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_shape=(1, 8, 8))
    return to_bytes(Checkpoint(state=model.state_dict(), meta={"arch": "mlp"}))


def npz_bytes() -> bytes:
    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])
    return buf.getvalue()


def send(client, kind: str, filename: str, body: bytes, headers: dict | None = None):
    return client.post("/uploads", params={"kind": kind, "filename": filename}, content=body,
                       headers={"Content-Type": "application/octet-stream", **(headers or {})})


def uploaded_files(client) -> list[Path]:
    root = Path(client.runtime.settings.artifacts) / "uploads"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_an_uploaded_checkpoint_and_dataset_start_a_job_by_id(api, tmp_path):
    ckpt, data = checkpoint_bytes(), npz_bytes()
    with sdk(api) as c:
        path = tmp_path / "dense.safetensors"
        path.write_bytes(ckpt)
        up_ckpt = c.upload(path, "checkpoint")
    r = send(api, "dataset", "digits.npz", data)
    assert r.status_code == 201, r.text
    up_data = r.json()
    assert up_ckpt["ref"] == f"upload:{up_ckpt['id']}" and up_ckpt["size_bytes"] == len(ckpt)
    import hashlib
    assert up_ckpt["sha256"] == hashlib.sha256(ckpt).hexdigest()
    assert {u["id"] for u in api.get("/uploads").json()["data"]} == {up_ckpt["id"], up_data["id"]}

    spec = {"name": "from-uploads", "model": {"arch": "mlp", "checkpoint": up_ckpt["ref"]},
            "data": {"name": "npz", "path": up_data["ref"], "batch_size": 64},
            "prune": {"target_sparsity": 0.5, "phases": 1}, "retrain": {"epochs": 1},
            "soup": {"ingredients": 1, "min_ingredients": 1}}
    r = api.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = api.get(f"/jobs/{r.json()['id']}").json()
    # the stored spec holds the uploads' own files (in the artifact store), which the workers read
    assert job["spec"]["model"]["checkpoint"] == api.store.get_upload(up_ckpt["id"]).uri
    assert job["spec"]["data"]["path"] == api.store.get_upload(up_data["id"]).uri
    # and the job runs from them, as the driver would (the stored spec, trusted)
    rec = LocalRecorder(progress=False)
    result = Pipeline(stored_spec(job["spec"], api.store), SequentialExecutor(), rec,
                      ArtifactStore(str(tmp_path / "run"))).run()
    dense = next(m for m in rec.models if m["kind"] == "dense")
    sent = load(api.store.get_upload(up_ckpt["id"]).uri).state
    assert all(torch.equal(load(dense["uri"]).state[k], v) for k, v in sent.items())     # phase 0 = the upload
    assert [p.phase for p in result.phases] == [0, 1]


def test_uploads_are_their_owners_only(api_auth):
    alice, bob = bearer(api_auth, "alice"), bearer(api_auth, "bob")
    r = send(api_auth, "checkpoint", "a.safetensors", checkpoint_bytes(), alice)
    assert r.status_code == 201 and r.json()["owner"] == "alice"
    mine = r.json()
    assert api_auth.get(f"/uploads/{mine['id']}", headers=bob).status_code == 404
    assert api_auth.get("/uploads", headers=bob).json() == {"data": [], "count": 0}
    assert api_auth.get("/uploads", headers=bearer(api_auth, "root")).json()["count"] == 1      # an admin sees all
    assert api_auth.delete(f"/uploads/{mine['id']}", headers=bob).status_code == 404
    # in a spec, another user's upload gets the same answer as one that does not exist
    answers = []
    for ref in (mine["ref"], "upload:" + "0" * 32):
        r = api_auth.post("/jobs", json={"model": {"arch": "mlp", "checkpoint": ref}}, headers=bob)
        assert r.status_code == 422
        answers.append(r.json()["detail"][0]["msg"].replace(ref.removeprefix("upload:"), "ID"))
    assert answers[0] == answers[1] and "no upload" in answers[0]
    assert api_auth.post("/jobs", json={"model": {"arch": "mlp", "checkpoint": mine["ref"]}},
                         headers=alice).status_code == 201
    assert send(api_auth, "checkpoint", "a.safetensors", checkpoint_bytes()).status_code == 401    # no token


def test_a_refused_oversized_or_broken_upload_leaves_nothing(api):
    # content that is not what its kind needs: 422 naming why
    for kind, name, body, why in [
            ("checkpoint", "x.safetensors", b"\x00" * 100, "not a Ladle checkpoint"),
            ("checkpoint", "x.safetensors", b"\xff" * 100, "not a safetensors file"),
            ("checkpoint", "x.safetensors", checkpoint_bytes()[:-10], "truncated"),
            ("checkpoint", "x.pt", checkpoint_bytes(), "ends in .safetensors"),
            ("dataset", "d.npz", b"not a zip", "not an .npz file"),
            ("dataset", "d.csv", b"a,b", "ends in .npz or .txt"),
            ("dataset", "../../etc/d.txt", b"text", "filename"),
            ("checkpoint", "x.safetensors", b"", "empty")]:
        r = send(api, kind, name, body)
        assert r.status_code == 422 and why in r.json()["detail"][0]["msg"], (name, r.text)
    assert send(api, "model", "x.safetensors", checkpoint_bytes()).status_code == 422        # unknown kind
    # over the upload limit (a setting, apart from the 1 MiB body limit of other requests): 413
    api.runtime.settings.max_upload_bytes = 4096
    r = send(api, "dataset", "big.txt", b"word " * 2000)
    assert r.status_code == 413 and "4 KiB (4096 bytes)" in r.json()["detail"]

    def chunked():                                 # no Content-Length: cut off once past the limit
        for _ in range(10):
            yield b"word " * 500
    r = api.post("/uploads", params={"kind": "dataset", "filename": "big.txt"}, content=chunked())
    assert r.status_code == 413
    assert uploaded_files(api) == [] and api.get("/uploads").json()["count"] == 0
    # a body over the general limit is fine for an upload under its own
    api.runtime.settings.max_upload_bytes = 4 << 20
    r = send(api, "dataset", "big.txt", b"word " * 300_000)          # 1.5 MB
    assert r.status_code == 201 and r.json()["size_bytes"] == 1_500_000


def test_a_deleted_upload_is_gone_and_a_dataset_is_not_a_checkpoint(api):
    data = send(api, "dataset", "corpus.txt", b"to be or not to be " * 100).json()
    r = api.post("/jobs", json={"model": {"arch": "mlp", "checkpoint": data["ref"]}})
    assert r.status_code == 422 and "is a dataset; model.checkpoint names a checkpoint" in r.json()["detail"][0]["msg"]
    assert len(uploaded_files(api)) == 1
    assert api.delete(f"/uploads/{data['id']}").status_code == 200
    assert uploaded_files(api) == [] and api.get(f"/uploads/{data['id']}").status_code == 404
    r = api.post("/jobs", json={"data": {"name": "npz", "path": data["ref"]}})
    assert r.status_code == 422 and "no upload" in r.json()["detail"][0]["msg"]


def test_a_dataset_in_a_remote_artifact_store_is_read_through_a_local_copy(tmp_path, monkeypatch):
    """With an s3:// (here: fsspec's in-memory) artifact store an upload's URL is not a path: the workers
    read the file through a local copy."""
    import fsspec

    from workers.data import DataConfig, load_splits
    monkeypatch.setenv("LADLE_CACHE", str(tmp_path / "cache"))
    url = "memory://artifacts/uploads/abc/digits.npz"
    with fsspec.open(url, "wb") as f:
        f.write(npz_bytes())
    splits = load_splits(DataConfig(name="npz", path=url), 0)
    assert len(splits.test.y) == 397 and splits.train.images.shape[1:] == (1, 8, 8)
    assert list((tmp_path / "cache").rglob("digits.npz"))
