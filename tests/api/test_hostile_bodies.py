"""Generated hostile bodies (hypothesis) against every POST route with a body, in-process on SQLite and on
PostgreSQL: a valid body with one value replaced by something hostile (a non-finite or huge number, a huge
or odd string, deep nesting, a wrong type). Never a 5xx; a refused request stores nothing; the job list
answers 200 afterwards. (tests/api/test_contract.py fuzzes the whole API from its schema, over HTTP.)"""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.spec import JobSpec
from tests.api.conftest import in_process
from tests.api.test_routes import JOB
from tests.api.test_uploads import checkpoint_bytes, uploaded_files

RAW = "\u2063RAW:"           # a string standing for raw JSON text, swapped in after json.dumps
HOSTILE = st.one_of(
    st.sampled_from([RAW + "NaN", RAW + "Infinity", RAW + "-Infinity", RAW + "1e400", RAW + "-1e999",
                     RAW + "1" * 5000, RAW + "[" * 3000 + "]" * 3000, RAW + '{"a":' * 500 + "1" + "}" * 500]),
    st.sampled_from([10**30, -10**30, 2**63, -1, 0, 1e-320, 1e308, True, None, [], {}, [[[[[[]]]]]],
                     "x" * 100_000, "\x00", "\ud800", "🙂" * 1000, "../../etc/passwd", "upload:../x", "model:x",
                     "hf:/etc", "import:os:system"]),
    st.text(max_size=50), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=300))


def leaves(value, path=()):
    """Every path into a JSON value (objects' keys and lists' indices), the value's own included."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))


def replaced(value, path, new):
    if not path:
        return new
    value = json.loads(json.dumps(value))
    at = value
    for k in path[:-1]:
        at = at[k]
    at[path[-1]] = new
    return value


def body_text(value) -> bytes:
    """`value` as JSON text, its RAW strings written as the raw text they carry (NaN, deep nesting, ...)."""
    text = json.dumps(value)
    while RAW in text:
        start = text.index('"' + RAW.encode("unicode_escape").decode())
        end = text.index('"', start + 1)
        raw = json.loads(text[start:end + 1])[len(RAW):]
        text = text[:start] + raw + text[end + 1:]
    return text.encode("utf-8", "surrogatepass")


JOB_FULL = JobSpec.model_validate(dict(JOB, soup={"ingredients": 2, "vary": "lr", "values": [0.1, 0.2]},
                                       search={"trials": 2, "space": {"lr": {"loguniform": [0.01, 0.1]}}},
                                       timeout=3600)).model_dump(mode="json")
JOB_PATHS = sorted(set(leaves(JOB_FULL)), key=str)
TOKEN = {"name": "ci", "admin": False, "expires_in": "30d"}
TOKEN_PATHS = sorted(set(leaves(TOKEN)), key=str)


def header_of(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n])


CKPT = checkpoint_bytes()
CKPT_HEADER = header_of(CKPT)
CKPT_PATHS = sorted(set(leaves(CKPT_HEADER)), key=str)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    if request.param == "sqlite":
        yield from in_process(tmp, "off", [tmp])
    else:
        from tests.conftest import fresh_pg_database
        with fresh_pg_database() as url:
            yield from in_process(tmp, "off", [tmp], url=url)


def counts(app) -> tuple[int, int, int, int]:
    r = app.get("/jobs")
    assert r.status_code == 200, r.text
    return (r.json()["count"], len(app.get("/tokens").json()["data"]), app.get("/uploads").json()["count"],
            len(uploaded_files(app)))


EXAMPLES = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def post_job(app, value):
    return app.post("/jobs", content=body_text(value), headers={"Content-Type": "application/json"})


def post_token(app, value):
    r = app.post("/tokens", content=body_text(value), headers={"Content-Type": "application/json"})
    if r.status_code == 201:
        assert app.delete(f"/tokens/{r.json()['id']}").status_code == 200
    return r


def post_checkpoint(app, header):
    raw = body_text(header)
    n = struct.unpack("<Q", CKPT[:8])[0]
    r = app.post("/uploads", params={"kind": "checkpoint", "filename": "c.safetensors"},
                 content=struct.pack("<Q", len(raw)) + raw + CKPT[8 + n:],
                 headers={"Content-Type": "application/octet-stream"})
    if r.status_code == 201:
        assert app.delete(f"/uploads/{r.json()['id']}").status_code == 200
    return r


@pytest.mark.parametrize("post, valid, paths", [(post_job, JOB_FULL, JOB_PATHS), (post_token, TOKEN, TOKEN_PATHS),
                                                (post_checkpoint, CKPT_HEADER, CKPT_PATHS)],
                         ids=["jobs", "tokens", "checkpoint-uploads"])
def test_hostile_bodies(app, post, valid, paths):
    @EXAMPLES
    @given(path=st.sampled_from(paths), value=HOSTILE)
    def one(path, value):
        before = counts(app)
        r = post(app, replaced(valid, path, value))
        assert r.status_code < 500, (r.status_code, r.text[:2000])
        if r.status_code >= 400:
            assert counts(app) == before, r.text[:500]
    one()
    assert app.get("/jobs").status_code == 200
