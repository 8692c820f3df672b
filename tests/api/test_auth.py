"""Auth (issue 15), in-process against the app with auth on (`api_auth`) and off (`api`): the LADLE_AUTH
setting alone decides it (never which tokens exist); tokens expire and are revoked (the admin token API,
`ladle token`), and a revocation counts at once here and within AUTH_MAX_AGE from elsewhere; /tokens and
/cluster are for admins, /health says nothing secret; with auth off only loopback Host names are served;
`ladle serve` with auth on and no admin token refuses to start."""

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from typer.testing import CliRunner

from api.app import create_app
from api.deps import AUTH_MAX_AGE
from service.cluster import free_ports
from service.orm import utcnow
from service.runtime import Runtime
from service.settings import Settings, get_settings
from service.store import Store
from tests.api.conftest import NO_RAY

JOB = {"name": "auth", "dense": {"epochs": 1}, "prune": {"target_sparsity": 0.5, "phases": 1},
       "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def refused(r, why: str) -> None:
    assert r.status_code == 401 and why in r.json()["detail"], r.text
    assert r.headers["WWW-Authenticate"] == "Bearer"


# ---------------------------------------------------------------- the setting

@pytest.mark.parametrize("auth,host,on", [
    ("auto", "127.0.0.1", False), ("auto", "localhost", False), ("auto", "::1", False),
    ("auto", "0.0.0.0", True), ("auto", "192.168.1.5", True), ("auto", "127.0.0.2", True),
    ("auto", None, True),                                   # the bind address is unknown: fail closed
    ("on", "127.0.0.1", True), ("off", "0.0.0.0", False), ("ON", "localhost", True)])
def test_the_setting_alone_decides_and_auto_is_on_beyond_loopback(auth, host, on):
    assert Settings(auth=auth).auth_for(host) is on


def test_an_app_made_without_a_bind_address_has_auth_on_unless_it_is_off(monkeypatch, tmp_path):
    assert create_app(Runtime(Settings(home=tmp_path))).state.auth is True
    assert create_app(Runtime(Settings(home=tmp_path, auth="off"))).state.auth is False
    monkeypatch.setenv("LADLE_AUTH", "maybe")
    with pytest.raises(ValidationError, match="auth"):
        Settings()


def test_deleting_every_token_does_not_turn_auth_off(api_auth):
    api = api_auth
    _, root = api.store.create_token("root", admin=True)
    assert api.get("/jobs", headers=bearer(root)).status_code == 200
    with api.store.engine.begin() as c:
        c.execute(sa.text("DELETE FROM tokens"))
    time.sleep(AUTH_MAX_AGE + 0.1)                         # past the age of a remembered answer
    refused(api.get("/jobs"), "a bearer token is required")
    refused(api.get("/jobs", headers=bearer(root)), "unknown or revoked token")
    assert api.post("/jobs", json=JOB).status_code == 401
    assert api.get("/me").json() == {"auth": True, "authenticated": False, "name": None, "admin": False}


def test_creating_a_token_does_not_turn_auth_on(api):
    _, alice = api.store.create_token("alice")
    assert api.get("/jobs").status_code == 200
    assert api.get("/me").json() == {"auth": False, "authenticated": True, "name": None, "admin": True}


# ---------------------------------------------------------------- revocation and expiry

def test_a_token_revoked_through_the_api_is_refused_at_once(api_auth):
    api = api_auth
    _, root = api.store.create_token("root", admin=True)
    alice, alice_secret = api.store.create_token("alice")
    assert api.get("/jobs", headers=bearer(alice_secret)).status_code == 200     # remembered now
    r = api.delete(f"/tokens/{alice.id}", headers=bearer(root))
    assert r.status_code == 200 and r.json()["state"] == "revoked" and r.json()["revoked_at"], r.text
    refused(api.get("/jobs", headers=bearer(alice_secret)), "'alice' was revoked on")
    again = api.delete(f"/tokens/{alice.id}", headers=bearer(root))
    assert again.status_code == 200 and again.json()["revoked_at"] == r.json()["revoked_at"]
    assert api.delete("/tokens/no-such-token", headers=bearer(root)).status_code == 404
    assert api.get("/me", headers=bearer(alice_secret)).json()["authenticated"] is False


def test_a_token_revoked_elsewhere_is_refused_within_the_max_age(api_auth):
    api = api_auth
    _, alice = api.store.create_token("alice")
    assert api.get("/jobs", headers=bearer(alice)).status_code == 200            # remembered now
    other = Store(api.store.url, migrate=False)                                   # another process
    try:
        other.revoke_token("alice")
    finally:
        other.engine.dispose()
    revoked = time.monotonic()
    while (r := api.get("/jobs", headers=bearer(alice))).status_code == 200:
        assert time.monotonic() - revoked < AUTH_MAX_AGE + 0.3, "a revoked token still passes"
        time.sleep(0.05)
    refused(r, "revoked")


def test_an_expired_token_is_refused(api_auth):
    api = api_auth
    _, root = api.store.create_token("root", admin=True)
    _, stale = api.store.create_token("stale", expires_at=utcnow() - timedelta(seconds=1))
    refused(api.get("/jobs", headers=bearer(stale)), "'stale' expired on")
    r = api.post("/tokens", json={"name": "brief", "expires_in": 0.5}, headers=bearer(root))
    assert r.status_code == 201, r.text
    brief = r.json()
    assert api.get("/jobs", headers=bearer(brief["secret"])).status_code == 200   # good, and remembered ...
    used = time.monotonic()
    time.sleep(max(0.0, _ts(brief["expires_at"]) - time.time()) + 0.05)
    assert time.monotonic() - used < AUTH_MAX_AGE                                 # ... and still remembered
    refused(api.get("/jobs", headers=bearer(brief["secret"])), "'brief' expired on")
    states = {t["name"]: t["state"] for t in api.get("/tokens", headers=bearer(root)).json()["data"]}
    assert states == {"root": "active", "stale": "expired", "brief": "expired"}


# ---------------------------------------------------------------- admin only

def test_the_token_api_is_for_admins_and_shows_a_secret_only_when_made(api_auth):
    api = api_auth
    root_row, root = api.store.create_token("root", admin=True)
    _, alice = api.store.create_token("alice")
    for method, path, body in (("GET", "/tokens", None), ("POST", "/tokens", {"name": "mallory", "admin": True}),
                               ("DELETE", f"/tokens/{root_row.id}", None)):
        r = api.request(method, path, json=body, headers=bearer(alice))
        assert r.status_code == 403 and "admin" in r.json()["detail"], (method, path, r.text)
        assert api.request(method, path, json=body).status_code == 401
    assert api.get("/me", headers=bearer(root)).json()["admin"] is True                  # not revoked by alice
    r = api.post("/tokens", json={"name": "bob", "expires_in": "30d"}, headers=bearer(root))
    assert r.status_code == 201, r.text
    bob = r.json()
    assert bob["name"] == "bob" and not bob["admin"] and bob["state"] == "active"
    assert bob["last4"] == bob["secret"][-4:]
    assert abs((utcnow() + timedelta(days=30)).timestamp() - _ts(bob["expires_at"])) < 60
    assert api.get("/me", headers=bearer(bob["secret"])).json()["name"] == "bob"
    assert api.post("/tokens", json={"name": "bob"}, headers=bearer(root)).status_code == 409
    for body, field in (({"name": "x", "expires_in": "30"}, "expires_in"),
                        ({"name": "x", "expires_in": 0}, "expires_in"),
                        ({"name": ""}, "name"), ({"name": "a\nb"}, "name"),
                        ({"name": "x", "expires_at": "2030-01-01"}, "expires_at")):
        r = api.post("/tokens", json=body, headers=bearer(root))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
    r = api.get("/tokens", headers=bearer(root))
    assert r.status_code == 200 and r.json()["count"] == 3
    assert [t["name"] for t in r.json()["data"]] == ["root", "alice", "bob"]
    assert [t["last4"] for t in r.json()["data"]] == [root[-4:], alice[-4:], bob["secret"][-4:]]
    for secret in (root, alice, bob["secret"]):
        assert secret not in r.text
    assert all("secret" not in t and "token_hash" not in t for t in r.json()["data"])


def test_cluster_details_are_for_admins(api_auth):
    api = api_auth
    _, root = api.store.create_token("root", admin=True)
    _, alice = api.store.create_token("alice")
    r = api.get("/cluster", headers=bearer(alice))
    assert r.status_code == 403 and NO_RAY not in r.text
    assert api.get("/cluster").status_code == 401
    r = api.get("/cluster", headers=bearer(root))                 # past the gate: Ray (not there) is asked
    assert r.status_code == 503 and r.json()["detail"].startswith(f"Ray at {NO_RAY}")


def test_health_is_public_and_names_no_address(api_auth, monkeypatch):
    dispatcher = api_auth.runtime.dispatcher
    monkeypatch.setattr(dispatcher, "is_running", lambda: True)
    monkeypatch.setattr(dispatcher, "ray_error", "Ray's Jobs API at http://10.1.2.3:8265 does not answer: ConnectError")
    r = api_auth.get("/health")                                   # no token
    assert r.status_code == 200 and r.json()["status"] == "degraded" and "does not answer" in r.json()["ray"]
    assert "10.1.2.3" not in r.text and "ConnectError" not in r.text


# ---------------------------------------------------------------- Host names

@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "[::1].evil.example", "10.0.0.5:8000", "localhost:80x", "0.0.0.0:8000"])
def test_with_auth_off_other_host_names_are_refused(api, host):
    for method, path in (("GET", "/health"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/me")):
        r = api.request(method, path, json=JOB if method == "POST" else None, headers={"Host": host})
        assert r.status_code == 400 and "is not served" in r.json()["detail"], (method, path, r.text)
    assert api.get("http://localhost/", headers={"Host": host}).status_code == 400        # the dashboard too
    assert api.store.list_jobs()[1] == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:8000", "[::1]", "[::1]:8000",
                                  "LocalHost:1"])
def test_with_auth_off_loopback_host_names_are_served(api, host):
    assert api.get("/health", headers={"Host": host}).status_code == 200
    assert api.post("/jobs", json=JOB, headers={"Host": host}).status_code == 201


def test_with_auth_on_any_host_name_is_served(api_auth):
    _, alice = api_auth.store.create_token("alice")
    assert api_auth.get("/health", headers={"Host": "ladle.example.org"}).status_code == 200
    assert api_auth.get("/jobs", headers={"Host": "ladle.example.org", **bearer(alice)}).status_code == 200


# ---------------------------------------------------------------- the CLI

@pytest.fixture
def ladle(api_auth, monkeypatch):
    """`ladle ...` in-process on the database of `api_auth` (LADLE_DATABASE_URL): (exit code, stdout, stderr)."""
    for k in list(os.environ):
        if k.startswith("LADLE_"):
            monkeypatch.delenv(k)
    env = {"LADLE_HOME": str(api_auth.runtime.settings.home), "LADLE_DATABASE_URL": api_auth.store.url}

    def run(*args: str) -> tuple[int, str, str]:
        from api.cli import app
        get_settings.cache_clear()
        r = CliRunner().invoke(app, list(args), env=env)
        get_settings.cache_clear()
        return r.exit_code, r.stdout, r.stderr
    return run


def test_ladle_token_create_list_revoke(api_auth, ladle):
    api = api_auth
    code, alice, err = ladle("token", "create", "--name", "alice", "--expires-in", "30d")
    assert code == 0 and alice.strip().startswith("ladle_") and "expires" in err, err
    alice = alice.strip()
    code, root, _ = ladle("token", "create", "--name", "root", "--admin")
    root = root.strip()
    assert api.get("/me", headers=bearer(alice)).json()["name"] == "alice"
    assert ladle("token", "create", "--name", "alice")[0] == 2                      # not revoked: taken
    code, _, err = ladle("token", "create", "--name", "x", "--expires-in", "soon")
    assert code == 2 and "--expires-in" in err and "Traceback" not in err
    code, out, _ = ladle("token", "list")
    assert code == 0 and alice not in out and root not in out                       # never a secret
    rows = {line.split()[1]: line for line in out.splitlines() if line.split()[1:2] in (["alice"], ["root"])}
    assert set(rows) == {"alice", "root"}
    assert "user" in rows["alice"] and "active" in rows["alice"] and f"…{alice[-4:]}" in rows["alice"]
    assert "admin" in rows["root"] and "never" in rows["root"] and f"…{root[-4:]}" in rows["root"]
    assert (utcnow() + timedelta(days=30)).strftime("%Y-%m-%d") in rows["alice"]      # expires in 30 days
    code, _, err = ladle("token", "revoke", "alice")
    assert code == 0 and "revoked" in err
    revoked = time.monotonic()
    while (r := api.get("/jobs", headers=bearer(alice))).status_code == 200:         # the server hears of it
        assert time.monotonic() - revoked < AUTH_MAX_AGE + 0.3, "a revoked token still passes"
        time.sleep(0.05)
    refused(r, "'alice' was revoked")
    code, out, _ = ladle("token", "list")
    assert "revoked" in next(line for line in out.splitlines() if " alice " in line)
    code, _, err = ladle("token", "revoke", "nobody")
    assert code == 1 and "no token 'nobody'" in err
    code, out, _ = ladle("token", "create", "--name", "alice")                     # a new token, same name
    assert code == 0 and api.get("/me", headers=bearer(out.strip())).json()["name"] == "alice"


@pytest.mark.parametrize("auth,host,why", [("on", "127.0.0.1", "LADLE_AUTH=on"),
                                           ("auto", "0.0.0.0", "beyond loopback")])
def test_serve_refuses_to_start_with_auth_on_and_no_admin_token(tmp_path, auth, host, why):
    """A user token is no admin token, nor is a revoked or expired admin token. The refusal comes before
    anything starts: Ray is given an address where nothing listens, so that were the check late, the
    server would start serving and the test would time out."""
    url = f"sqlite:///{tmp_path / 'ladle.db'}"
    store = Store(url)
    store.create_token("alice")
    store.revoke_token(store.create_token("root", admin=True)[0].id)
    store.create_token("old", admin=True, expires_at=utcnow() - timedelta(seconds=1))
    store.engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LADLE_")}
    env.update(LADLE_HOME=str(tmp_path), LADLE_DATABASE_URL=url, LADLE_RAY_ADDRESS=NO_RAY, LADLE_AUTH=auth,
               LADLE_DISPATCH="false")
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--host", host, "--port", str(free_ports(1)[0])],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "refusing to serve" in r.stderr and why in r.stderr and "ladle token create" in r.stderr
    assert "LADLE_ADMIN_TOKEN" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - started < 30
