"""Issue 25's tries again, through a running service (uvicorn on loopback, the embedded runtime on the
session's Ray cluster, auth on, two users and an admin; jobs stored, not run): no answer is a 5xx, every
refusal is a 4xx naming the field or the limit, both users' job lists answer 200 throughout, and nothing
refused leaves a row or a file."""

import json
import socket
import struct
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.conftest import make_server
from tests.api.test_routes import JOB
from tests.api.test_uploads import checkpoint_bytes


@pytest.fixture(scope="module")
def service(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-live")
    with make_server(tmp, ray_head, dispatch=False, auth="on") as server:
        store = server.runtime.store
        tokens = {name: store.create_token(name, admin=name == "root")[1] for name in ("alice", "bob", "root")}
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=60) as http:
            yield server, http, {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}, tmp


def raw_json(http, path, text, headers):
    return http.post(path, content=text.encode("utf-8", "surrogatepass"),
                     headers={**headers, "Content-Type": "application/json"})


def header_file(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 16


def test_the_issues_tries_through_a_running_service(service):
    server, http, who, tmp = service
    alice, bob, root = who["alice"], who["bob"], who["root"]
    deep = tmp / "deep"
    d = deep
    for i in range(4):
        d = d / f"d{i}"
        d.mkdir(parents=True)
        (d / "t.txt").write_text("words " * 100)
    (tmp / "llm").mkdir()
    (tmp / "llm" / "config.json").write_text("{}")
    good = http.post("/jobs", json=JOB, headers=alice)
    assert good.status_code == 201, good.text
    answers = []

    def tried(what, r, expected):
        answers.append((what, r.status_code))
        assert r.status_code == expected, (what, r.status_code, r.text[:500])
        lists = [http.get("/jobs", headers=h).status_code for h in (alice, bob, root)]
        assert lists == [200, 200, 200], (what, lists)
        return r

    # 1. non-finite numbers anywhere, in specs and tokens; the keep-alive connection lives on
    for text in ('{"timeout": NaN}', '{"dense": {"lr": Infinity}}', '{"dense": {"lr": 1e400}}'):
        tried(text, raw_json(http, "/jobs", text, alice), 422)
    for text in ('{"name": "t", "expires_in": NaN}', '{"name": "t", "expires_in": 1e400}'):
        tried(text, raw_json(http, "/tokens", text, root), 422)
    # 2. a NaN among the soup's values, stored for everyone's list to trip on
    r = tried("soup values NaN", raw_json(http, "/jobs", '{"soup": {"ingredients": 1, "min_ingredients": 1, '
                                          '"vary": "lr", "values": [NaN]}}', bob), 422)
    assert r.json()["detail"][0]["loc"][0] == "body"
    # 3. a 100k-deep body
    tried("deep body", raw_json(http, "/jobs", "[" * 100_000 + "]" * 100_000, alice), 422)
    tried("deep body", raw_json(http, "/jobs", '{"model": {"kwargs": {"a": ' + "[" * 100_000 + "]" * 100_000
                                + "}}}", alice), 422)
    # 4. checkpoint uploads whose header is JSON of the wrong shape, or deeply nested
    for header in ("abc", None, {"state/w": {"dtype": "F32", "shape": [2], "data_offsets": ["a", None]}},
                   {"state/w": {"dtype": "F32", "shape": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                                "data_offsets": [0, 8]}}):
        tried(f"header {header!r:.40}", http.post("/uploads", params={"kind": "checkpoint", "filename": "c.safetensors"},
                                                   content=header_file(header), headers=alice), 422)
    # 5. a glob of twelve '**'
    llm = {"arch": f"hf:{tmp / 'llm'}"}
    r = tried("glob", http.post("/jobs", json={"model": llm, "data": {"name": "text", "path": str(deep) + "/**" * 12
                                                                      + "/*.txt"}}, headers=alice), 422)
    assert "more than one '**'" in r.text and r.elapsed.total_seconds() < 5
    # 6. an uploaded checkpoint whose metadata asks for a dense history of 10^15 steps: kept (its tensors are
    # fine), a job may name it, and its driver ignores the history with an event (tests/service/test_pipeline.py)
    from workers.checkpoint import Checkpoint, from_bytes, to_bytes
    ckpt = from_bytes(checkpoint_bytes())
    hostile = to_bytes(Checkpoint(state=ckpt.state, meta={"arch": "mlp", "dense_schedule": {
        "kind": "cosine", "lr": 0.1, "epochs": 1000, "steps_per_epoch": 10**12}}))
    up = tried("hostile metadata", http.post("/uploads", params={"kind": "checkpoint", "filename": "h.safetensors"},
                                             content=hostile, headers=alice), 201).json()
    tried("job from it", http.post("/jobs", json=dict(JOB, model={"arch": "mlp", "checkpoint": f"upload:{up['id']}"}),
                                   headers=alice), 201)
    # 8. an upload broken off mid-body leaves nothing; a delete removes the file, then the row
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port)) as s:
        s.sendall(b"POST /api/v1/uploads?kind=dataset&filename=x.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  + f"Authorization: {alice['Authorization']}\r\n".encode()
                  + b"Content-Length: 100000\r\nContent-Type: application/octet-stream\r\n\r\n" + b"x" * 5000)
    tried("delete", http.delete(f"/uploads/{up['id']}", headers=alice), 200)
    # model kwargs of a billion-wide MLP
    tried("kwargs", http.post("/jobs", json=dict(JOB, model={"arch": "mlp", "kwargs": {"widths": [10**9, 10**9]}}),
                              headers=bob), 422)
    assert all(code < 500 for _, code in answers)
    jobs = http.get("/jobs", headers=root).json()
    assert jobs["count"] == 2                     # the good job and the one from the upload; nothing refused
    assert http.get("/uploads", headers=root).json()["count"] == 0
    import time
    time.sleep(1)                                 # the broken-off upload's handler cleans up as it ends
    leftovers = [p for p in (tmp / "artifacts" / "uploads").rglob("*") if p.is_file()]
    assert leftovers == []
