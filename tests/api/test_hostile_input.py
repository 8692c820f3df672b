"""Hostile input, as issue 25 tried it against `ladle serve` (in-process here, on SQLite): every refusal
is a 4xx naming the field, never a 500; nothing refused is stored; one user's job can never break the job
list for everyone."""

import json
import struct

import pytest
import sqlalchemy as sa

from api.client import LimitReached
from tests.api.test_routes import JOB, sdk
from tests.api.test_spec_security import site  # noqa: F401  (a fixture)
from tests.api.test_uploads import bearer, checkpoint_bytes, send, uploaded_files


def post_raw(client, path: str, text: str, headers: dict | None = None):
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json", **(headers or {})})


def detail(r) -> list[dict]:
    assert r.status_code == 422, (r.status_code, r.text)
    return r.json()["detail"]


def jobs_count(api) -> int:
    r = api.get("/jobs")
    assert r.status_code == 200, r.text
    return r.json()["count"]


@pytest.mark.parametrize("text, where", [
    ('{"name": "x", "timeout": NaN}', ["body"]),
    ('{"name": "x", "dense": {"lr": Infinity}}', ["body"]),
    ('{"name": "x", "dense": {"lr": -Infinity}}', ["body"]),
    ('{"name": "x", "dense": {"lr": 1e400}}', ["body", "dense", "lr"]),
    ('{"name": "x", "soup": {"ingredients": 2, "vary": "lr", "values": [0.1, 1e999]}}', ["body", "soup", "values", 1]),
    ('{"name": "x", "timeout": 1' + "0" * 5000 + "}", ["body"]),
])
def test_a_non_finite_or_huge_number_in_a_spec_is_a_422_naming_where(api, text, where):
    r = post_raw(api, "/jobs", text)
    errors = detail(r)
    assert errors[0]["loc"][:len(where)] == where, errors
    assert "finite" in errors[0]["msg"] or "digits" in errors[0]["msg"]
    assert jobs_count(api) == 0


def test_a_non_finite_token_lifetime_is_a_422_and_the_connection_lives_on(api_auth):
    root = bearer(api_auth, "root")
    for text in ('{"name": "a", "expires_in": NaN}', '{"name": "a", "expires_in": 1e400}',
                 '{"name": "a", "expires_in": Infinity}'):
        errors = detail(post_raw(api_auth, "/tokens", text, root))
        assert errors[0]["loc"][0] == "body"
    # pydantic's own refusal of a value JSON can carry still names it
    errors = detail(api_auth.post("/tokens", json={"name": "a", "expires_in": [1]}, headers=root))
    assert errors[0]["loc"][:2] == ["body", "expires_in"]
    assert [t["name"] for t in api_auth.get("/tokens", headers=root).json()["data"]] == ["root"]


def test_a_nan_in_a_query_is_a_422_that_json_can_carry(api):
    r = api.get("/models/x/download", params={"format": "sparse", "wait": "nan"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "wait"]


def test_soup_values_must_be_finite_and_a_bad_row_cannot_break_the_list(api):
    r = post_raw(api, "/jobs", '{"name": "x", "soup": {"ingredients": 1, "min_ingredients": 1, "vary": "lr", '
                               '"values": [NaN]}}')
    assert detail(r)[0]["loc"][0] == "body"
    errors = detail(api.post("/jobs", json={"name": "x", "soup": {"ingredients": 1, "min_ingredients": 1,
                                                                  "vary": "lr", "values": [1e300]}}))
    assert errors[0]["loc"][:2] == ["body", "soup"], errors
    # a row written before these checks (bare NaN in its JSON column) no longer breaks the list
    good = api.post("/jobs", json=JOB).json()
    bad = api.post("/jobs", json=dict(JOB, name="bad")).json()
    with api.store.engine.begin() as c:
        c.execute(sa.text("UPDATE jobs SET spec = :s WHERE id = :id"),
                  {"s": '{"name": "bad", "model": {"arch": "mlp"}, "soup": {"values": [NaN]}}', "id": bad["id"]})
    r = api.get("/jobs")
    assert r.status_code == 200, r.text
    listed = {j["id"]: j for j in r.json()["data"]}
    assert set(listed) == {good["id"], bad["id"]}
    assert listed[good["id"]]["phases_total"] == JOB["prune"]["phases"]
    assert listed[bad["id"]]["name"] == "bad"


@pytest.mark.parametrize("depth", [100, 100_000])
def test_a_deeply_nested_body_is_a_422(api, api_auth, depth):
    text = '{"name": "x", "model": {"kwargs": ' + "[" * depth + "]" * depth + "}}"
    errors = detail(post_raw(api, "/jobs", text))
    assert errors[0]["loc"][:1] == ["body"] and "nested" in errors[0]["msg"]
    if depth == 100:                        # parsed, then refused where it goes too deep
        assert errors[0]["loc"][:4] == ["body", "model", "kwargs", 0]
    errors = detail(post_raw(api_auth, "/tokens", '{"name": ' + "[" * depth + "]" * depth + "}",
                             bearer(api_auth, "root")))
    assert "nested" in errors[0]["msg"]
    assert jobs_count(api) == 0


def header_file(header) -> bytes:
    """A safetensors-shaped file whose header is `header` (any JSON value)."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 16


@pytest.mark.parametrize("header", [
    "abc", None, [1, 2], 12,
    {"state/w": {"dtype": "F32", "shape": [2], "data_offsets": ["a", None]}, "__metadata__": {"ladle": "{}"}},
    {"state/w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "__metadata__": {"ladle": "{}"}},
    {"state/w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}, "__metadata__": {"ladle": "{}"}},
    {"state/w": "F32", "__metadata__": {"ladle": "{}"}},
    {"state/w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": "x"},
    {"state/w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"ladle": 5}},
    {"state/w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"ladle": "[" * 5000}},
    {"state/w": {"dtype": "F32", "shape": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                 "data_offsets": [0, 8]}},
])
def test_an_upload_whose_header_has_the_wrong_shape_is_a_422_and_leaves_nothing(api, header):
    r = send(api, "checkpoint", "c.safetensors", header_file(header))
    errors = detail(r)
    assert errors[0]["loc"] == ["body"], errors
    assert uploaded_files(api) == [] and api.get("/uploads").json()["count"] == 0


def test_a_real_checkpoint_still_uploads(api):
    r = send(api, "checkpoint", "c.safetensors", checkpoint_bytes())
    assert r.status_code == 201, r.text


def test_a_glob_with_many_recursive_parts_is_refused_at_once(api, site, monkeypatch):
    deep = site["roots"] / "deep"
    d = deep
    for i in range(6):
        d = d / f"d{i}"
        d.mkdir(parents=True)
        (d / "t.txt").write_text("words " * 50)
    import workers.config
    calls = []
    real = workers.config.glob.iglob
    monkeypatch.setattr(workers.config.glob, "iglob", lambda *a, **k: calls.append(a) or real(*a, **k))
    llm = {"arch": f"hf:{site['roots'] / 'llm'}"}
    path = str(deep) + "/**" * 12 + "/*.txt"
    r = api.post("/jobs", json={"name": "x", "model": llm, "data": {"name": "text", "path": path}})
    errors = [e for e in detail(r) if e["loc"][:2] == ["body", "data"]]
    assert errors and "more than one '**'" in errors[0]["msg"], r.text
    assert calls == []                      # refused before anything was listed
    # one '**' is listed, and once per submission (the access check's listing serves the spec's own check)
    r = api.post("/jobs", json={"name": "x", "model": llm, "data": {"name": "text", "path": f"{deep}/**/*.txt"}})
    assert not [e for e in r.json().get("detail", []) if e["loc"][:2] == ["body", "data"]], r.text
    assert len(calls) == 1
    # and a cap on the files one path stands for
    monkeypatch.setattr(workers.config, "MAX_TEXT_FILES", 3)
    r = api.post("/jobs", json={"name": "x", "model": llm, "data": {"name": "text", "path": f"{deep}/**/*.txt"}})
    errors = [e for e in detail(r) if e["loc"][:2] == ["body", "data"]]
    assert errors and "more than 3 files" in errors[0]["msg"]


def test_a_crashed_uploads_files_are_swept_and_a_live_one_is_kept(api):
    import os
    import time

    from service.uploads import sweep, sweep_temp_files
    root = api.runtime.settings.artifacts
    kept = send(api, "checkpoint", "c.safetensors", checkpoint_bytes()).json()
    crashed, live = (os.path.join(root, "uploads", name) for name in ("a" * 32, "b" * 32))
    for folder in (crashed, live):
        os.makedirs(folder)
        with open(os.path.join(folder, ".c.safetensors.partial"), "wb") as f:
            f.write(b"\0" * 100)
    old = time.time() - 3600
    os.utime(os.path.join(crashed, ".c.safetensors.partial"), (old, old))
    tmp = os.path.join(root, "jobs", "j", ".soup.safetensors.x1y2.tmp")
    os.makedirs(os.path.dirname(tmp))
    open(tmp, "wb").close()
    os.utime(tmp, (old, old))
    assert sweep(api.store, root) == ["a" * 32]
    assert sweep_temp_files(root) == 1 and not os.path.exists(tmp)
    assert os.path.exists(live) and not os.path.exists(crashed)
    assert api.get(f"/uploads/{kept['id']}").status_code == 200
    assert sorted(p.name for p in uploaded_files(api)) == [".c.safetensors.partial", "c.safetensors"]


def test_a_delete_removes_the_file_before_the_row(api, monkeypatch):
    import os

    from fsspec.implementations.local import LocalFileSystem
    up = send(api, "checkpoint", "c.safetensors", checkpoint_bytes()).json()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    with monkeypatch.context() as m:
        m.setattr(LocalFileSystem, "rm", refuse)
        r = api.delete(f"/uploads/{up['id']}")
    assert r.status_code == 503 and "kept" in r.json()["detail"]
    assert api.get(f"/uploads/{up['id']}").status_code == 200 and len(uploaded_files(api)) == 1
    assert api.delete(f"/uploads/{up['id']}").status_code == 200
    assert api.get(f"/uploads/{up['id']}").status_code == 404 and uploaded_files(api) == []


def test_a_model_too_large_or_that_does_not_build_is_a_422_before_anything_is_stored(api):
    for kwargs, words in (({"widths": [10**9, 10**9]}, "more than this service's limit"),
                          ({"widths": [-5]}, "do not build a model"), ({"widths": "abc"}, "model.kwargs")):
        r = api.post("/jobs", json=dict(JOB, model={"arch": "mlp", "kwargs": kwargs}))
        assert words in str(detail(r)), r.text
    api.runtime.settings = api.runtime.settings.model_copy(update={"max_model_parameters": 50_000})
    r = api.post("/jobs", json=dict(JOB, model={"arch": "mlp"}))       # 50,610 parameters on digits
    assert "50,610 parameters" in str(detail(r)) and "LADLE_MAX_MODEL_PARAMETERS" in str(detail(r))
    assert jobs_count(api) == 0


def test_per_user_quotas_and_the_default_timeout(api_auth):
    api_auth.runtime.settings = api_auth.runtime.settings.model_copy(update={
        "max_open_jobs_per_user": 2, "max_upload_bytes_per_user": 3000, "default_job_timeout": 3600.0})
    alice, root = bearer(api_auth, "alice"), bearer(api_auth, "root")
    first = api_auth.post("/jobs", json=JOB, headers=alice).json()
    assert first["spec"]["timeout"] == 3600.0
    assert api_auth.post("/jobs", json=dict(JOB, timeout=60), headers=alice).json()["spec"]["timeout"] == 60
    r = api_auth.post("/jobs", json=JOB, headers=alice)
    assert r.status_code == 429 and "LADLE_MAX_OPEN_JOBS_PER_USER" in r.json()["detail"]
    with pytest.raises(LimitReached, match="LADLE_MAX_OPEN_JOBS_PER_USER"):
        sdk(api_auth, alice["Authorization"].removeprefix("Bearer ")).submit(JOB)
    # the same idempotency key is still answered; an admin is not limited; an ended job frees a place
    assert api_auth.post("/jobs", json=JOB, headers=root).status_code == 201
    assert api_auth.post(f"/jobs/{first['id']}/cancel", headers=alice).status_code == 200
    assert api_auth.post("/jobs", json=JOB, headers=alice).status_code == 201
    # uploads: refused as soon as the bytes pass the quota, nothing kept
    r = send(api_auth, "dataset", "a.txt", b"x" * 2000, alice)
    assert r.status_code == 201, r.text
    r = send(api_auth, "dataset", "b.txt", b"x" * 2000, alice)
    assert r.status_code == 413 and "LADLE_MAX_UPLOAD_BYTES_PER_USER" in r.json()["detail"]
    assert len(uploaded_files(api_auth)) == 1
    assert send(api_auth, "dataset", "b.txt", b"x" * 2000, root).status_code == 201


def test_a_file_of_an_hf_folder_that_links_out_of_the_roots_is_refused(api, site):
    llm = site["roots"] / "llm"
    (llm / "tokenizer.json").symlink_to(site["marker"])
    r = api.post("/jobs", json={"name": "x", "model": {"arch": f"hf:{llm}"},
                                "data": {"name": "text", "path": str(site["roots"] / "corpus")}})
    errors = [e for e in detail(r) if e["loc"][:3] == ["body", "model", "arch"]]
    assert errors and "not readable" in errors[0]["msg"], r.text
