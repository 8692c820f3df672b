"""POST /jobs against hostile specs (issue 15, design section 8), in-process (no Ray): code a user names is
refused unless the operator allows its module, and never imported by the API; paths outside the data roots
and URLs get one answer that does not say whether they exist, and nothing outside the roots is opened to
give it; a checkpoint may be the caller's own model (model:<id>, or its artifact URL), never another user's."""

import os
import sys
import uuid

import pytest

from service.recorders import DBRecorder
from service.records import ModelRecord
from service.spec import parse_spec
from tests.fswatch import touched, watch


@pytest.fixture
def site(api, tmp_path):
    """The app's data roots narrowed to `roots/` (a dataset, an hf: folder and a text corpus in it), and a
    folder `outside/` holding a marker file that no request may open."""
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    for d in (roots / "llm", roots / "corpus", outside):
        d.mkdir(parents=True)
    (roots / "llm" / "config.json").write_text("{}")
    (roots / "corpus" / "a.txt").write_text("some text " * 100)
    (roots / "d.npz").write_bytes(b"")
    marker = outside / "marker.npz"
    marker.write_text("never to be read")
    api.runtime.settings = api.runtime.settings.model_copy(update={"data_roots": [roots.resolve()]})
    return {"roots": roots, "outside": outside, "marker": marker}


def jobs(api) -> int:
    return api.get("/jobs").json()["count"]


def refused(api, body, **headers) -> list[dict]:
    r = api.post("/jobs", json=body, headers=headers)
    assert r.status_code == 422, r.text
    return r.json()["detail"]


HOSTILE = [
    ({"model": {"arch": "import:subprocess:getoutput", "kwargs": {"cmd": "id; env"}}}, "model.arch"),
    ({"model": {"arch": "import:os:system", "kwargs": {"command": "id"}}}, "model.arch"),
    ({"model": {"arch": "import:builtins:eval"}}, "model.arch"),
    ({"model": {"checkpoint": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}}, "model.checkpoint"),
    ({"model": {"checkpoint": "file:///dev/zero"}}, "model.checkpoint"),
    ({"model": {"checkpoint": "/etc/shadow"}}, "model.checkpoint"),
    ({"model": {"checkpoint": "/dev/zero"}}, "model.checkpoint"),
    ({"data": {"name": "npz", "path": "/root/.ssh/id_rsa"}}, "data.path"),
    ({"data": {"name": "imagefolder", "path": "/root/.ssh"}}, "data.path"),
    ({"data": {"name": "fashion_mnist", "path": "/etc"}}, "data.path"),
    ({"model": {"arch": "hf:/etc"}, "data": {"name": "text", "path": "/etc/passwd"}}, "model.arch"),
    ({"model": {"arch": "hf:/root"}, "data": {"name": "text", "path": "/etc/*.conf"}}, "data.path"),
]


@pytest.mark.parametrize("body,field", HOSTILE, ids=[f"{f}:{str(b)[:50]}" for b, f in HOSTILE])
def test_every_hostile_spec_is_a_422_naming_the_field_and_stores_nothing(api, site, body, field):
    detail = refused(api, body)
    assert any(e["loc"] == ["body", *field.split(".")] for e in detail), detail
    assert jobs(api) == 0 and api.store.list_jobs()[1] == 0


def test_the_answer_is_the_same_whether_a_path_outside_the_roots_exists_or_not(api, site):
    marker, missing = site["marker"], site["outside"] / "missing.npz"
    for make in (lambda p: {"model": {"checkpoint": str(p)}}, lambda p: {"data": {"name": "npz", "path": str(p)}},
                 lambda p: {"model": {"arch": f"hf:{p}"}, "data": {"name": "text", "path": str(site['roots'])}}):
        answers = [[{k: e[k] for k in ("loc", "msg", "type")} for e in refused(api, make(p))]
                   for p in (marker, missing, site["outside"], "/root/.ssh/id_rsa", "/no/such/file")]
        assert all(a == answers[0] for a in answers), answers
        assert "not readable" in answers[0][0]["msg"] and str(site["roots"].resolve()) in answers[0][0]["msg"]
    assert jobs(api) == 0


def test_no_file_outside_the_roots_is_opened_or_listed_while_validating(api, site):
    marker, outside, roots = site["marker"], site["outside"], site["roots"]
    (roots / "link.npz").symlink_to(marker)
    with watch() as seen:                                          # a positive control: the watch sees opens
        marker.read_bytes()
    assert touched(seen, outside) == [("open", str(marker))]
    bodies = [{"model": {"checkpoint": str(marker)}}, {"model": {"checkpoint": f"file://{marker}"}},
              {"model": {"checkpoint": str(roots / "link.npz")}}, {"data": {"name": "npz", "path": str(marker)}},
              {"data": {"name": "npz", "path": f"{roots}/../outside/marker.npz"}},
              {"data": {"name": "imagefolder", "path": str(outside)}},
              {"model": {"arch": f"hf:{outside}"}, "data": {"name": "text", "path": str(roots / "corpus")}},
              {"model": {"arch": f"hf:{roots / 'llm'}"}, "data": {"name": "text", "path": str(marker)}},
              {"model": {"arch": f"hf:{roots / 'llm'}"}, "data": {"name": "text", "path": f"{outside}/**/*"}},
              {"model": {"arch": f"hf:{roots / 'llm'}", "kwargs": {"gguf_file": "../outside/marker.npz"}},
               "data": {"name": "text", "path": str(roots / "corpus")}}]
    with watch() as seen:
        for body in bodies:
            refused(api, body)
    assert touched(seen, outside) == []
    assert jobs(api) == 0


def test_specs_inside_the_roots_are_queued_with_their_paths_resolved(api, site):
    roots = site["roots"].resolve()
    r = api.post("/jobs", json={"data": {"name": "npz", "path": f"{site['roots']}/llm/../d.npz"}})
    assert r.status_code == 201 and r.json()["spec"]["data"]["path"] == str(roots / "d.npz"), r.text
    [err] = refused(api, {"data": {"name": "npz", "path": f"{site['roots']}/e.npz"}})
    assert "does not exist" in err["msg"]                                # inside the roots: the precise message
    body = {"model": {"arch": f"hf:{site['roots']}/corpus/../llm"}, "data": {"name": "text",
                                                                            "path": f"{site['roots']}/corpus/*.txt"}}
    r = api.post("/jobs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["model"]["arch"] == f"hf:{roots / 'llm'}"
    assert r.json()["spec"]["data"]["path"] == f"{roots}/corpus/*.txt"
    detail = refused(api, {"model": {"arch": f"hf:{roots / 'llm'}", "kwargs": {"trust_remote_code": True}},
                           "data": {"name": "text", "path": str(roots / "corpus")}})
    assert "trust_remote_code" in detail[0]["msg"] and detail[0]["loc"] == ["body", "model"]
    assert jobs(api) == 2


def test_an_allowed_import_prefix_is_queued_and_others_refused_and_neither_is_imported(api, site, marker_modules):
    api.runtime.settings = api.runtime.settings.model_copy(update={"allowed_import_prefixes": ["ladle_marker_allowed"]})
    r = api.post("/jobs", json={"model": {"arch": "import:ladle_marker_allowed:build"}})
    assert r.status_code == 201, r.text
    [err] = refused(api, {"model": {"arch": "import:ladle_marker_denied:build"}})
    assert err["loc"] == ["body", "model", "arch"] and "does not run the module 'ladle_marker_denied'" in err["msg"]
    [err] = refused(api, {"model": {"arch": "import:ladle_marker_allowed_too:build"}})    # not a submodule
    assert "does not run the module" in err["msg"]
    assert not any(m.exists() for m in marker_modules.values())
    assert not {"ladle_marker_allowed", "ladle_marker_denied"} & set(sys.modules)
    __import__("ladle_marker_allowed")                                  # the marker works: importing leaves it
    assert marker_modules["ladle_marker_allowed"].exists()
    assert jobs(api) == 1


def own_model(api, owner: str) -> ModelRecord:
    """A job of `owner` with a dense model in the artifact store."""
    job = api.store.create_job(parse_spec({}), owner=owner)
    model = ModelRecord(id=uuid.uuid4().hex, kind="dense", phase=0, name="phase0/dense",
                        uri=f"{api.runtime.settings.artifacts}/jobs/{job.id}/phase0/dense.safetensors", size_bytes=10,
                        sha256="0" * 64, sparsity=0.0, nonzeros=10, metrics={}, parents=[])
    DBRecorder(api.store, job.id).model_saved(model)
    return model


def test_a_checkpoint_is_the_callers_own_model_by_id_or_artifact_url_never_another_users(api_auth):
    api = api_auth                                   # auth on: callers are users
    _, alice = api.store.create_token("alice")
    _, bob = api.store.create_token("bob")
    _, root = api.store.create_token("root", admin=True)
    as_ = {name: {"Authorization": f"Bearer {token}"} for name, token in (("alice", alice), ("bob", bob),
                                                                          ("root", root))}
    mine = own_model(api, "alice")
    before = api.store.list_jobs()[1]
    r = api.post("/jobs", json={"model": {"checkpoint": f"model:{mine.id}"}}, headers=as_["alice"])
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["model"]["checkpoint"] == mine.uri     # the driver reads the model's artifact
    r = api.post("/jobs", json={"model": {"checkpoint": mine.uri}}, headers=as_["alice"])
    assert r.status_code == 201, r.text
    # bob: alice's model by id is no different from a model that does not exist; by URL, from any other URL
    [err] = refused(api, {"model": {"checkpoint": f"model:{mine.id}"}}, **as_["bob"])
    assert err["loc"] == ["body", "model", "checkpoint"] and f"no model '{mine.id}' among your models" in err["msg"]
    [missing] = refused(api, {"model": {"checkpoint": f"model:{'0' * 32}"}}, **as_["bob"])
    assert missing["msg"] == err["msg"].replace(mine.id, "0" * 32)
    [err] = refused(api, {"model": {"checkpoint": mine.uri}}, **as_["bob"])
    [other] = refused(api, {"model": {"checkpoint": "s3://bucket/x.safetensors"}}, **as_["bob"])
    assert err["msg"] == other["msg"] and "not readable" in err["msg"]
    # nor by its path with `..` in it: the artifact store is never readable as a file
    [err] = refused(api, {"model": {"checkpoint": mine.uri.replace("/jobs/", "/jobs/../jobs/")}}, **as_["alice"])
    assert "not readable" in err["msg"]
    assert api.post("/jobs", json={"model": {"checkpoint": f"model:{mine.id}"}}, headers=as_["root"]).status_code == 201
    assert api.store.list_jobs()[1] == before + 3


def test_the_openapi_schema_still_documents_the_job_spec(api):
    schema = api.get("/openapi.json").json()
    body = schema["paths"]["/api/v1/jobs"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    spec = schema["components"]["schemas"]["JobSpec"]
    assert {"model", "data", "prune", "soup"} <= set(spec["properties"])
    assert "ModelSpec" in schema["components"]["schemas"] and "DataSpec" in schema["components"]["schemas"]
    r = api.post("/jobs", json=["not", "a", "spec"])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
    assert os.environ.get("LADLE_DATA_ROOTS")                     # tests/conftest.py's roots are in force


@pytest.mark.parametrize("body,field", [
    ({"name": "x" * 201}, ["body", "name"]),
    ({"data": {"name": "text", "path": "p" * 5000}}, ["body", "data", "path"]),
    ({"model": {"kwargs": {"k": "v" * 5000}}}, ["body", "model", "kwargs"]),
    ({"search": {"space": {"schedule": {"choice": ["llr"] * 300}}}}, ["body", "search", "space", "schedule", "choice"]),
])
def test_over_long_spec_strings_and_lists_are_422_and_nothing_is_stored(api, body, field):
    r = api.post("/jobs", json=body)
    assert r.status_code == 422, r.text
    assert [e["loc"][:len(field)] for e in r.json()["detail"]][0] == field, r.json()
    assert api.get("/jobs").json()["count"] == 0
