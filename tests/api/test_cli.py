"""The `ladle` command as a user runs it (a real subprocess); the client commands against a live server."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.client import Client, NotFound
from tests.api.conftest import make_server
from workers.checkpoint import load

LADLE = str(Path(sys.executable).with_name("ladle"))


def ladle(*args, cwd=None):
    return subprocess.run([LADLE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_run_local_prints_the_phase_table_and_writes_models(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: cli\ndense: {epochs: 4}\nprune: {target_sparsity: 0.75, phases: 2}\n"
                    "retrain: {epochs: 1}\nsoup: {ingredients: 2}\n")
    out = tmp_path / "out"
    r = ladle("run", str(spec), "--local", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert rows[2][1] == "0.750"                  # sparsity reached in the last phase
    summary = json.loads((out / "summary.json").read_text())
    final = next(m for m in summary["models"] if m["id"] == summary["final_model_id"])
    ckpt = load(final["uri"])
    zeros = sum(int((ckpt.state[n] == 0).sum()) for n in ckpt.masks)
    total = sum(m.numel() for m in ckpt.masks.values())
    assert abs(zeros / total - final["sparsity"]) < 1e-6
    assert len(list((out / "models").rglob("*.safetensors"))) == 1 + 2 * 4


def test_json_output(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("dense: {epochs: 2}\nprune: {target_sparsity: 0.5, phases: 1}\nretrain: {epochs: 1}\n"
                    "soup: {ingredients: 2}\n")
    r = ladle("run", str(spec), "--local", "--json", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [p["index"] for p in data["phases"]] == [0, 1]


def test_bad_spec_names_the_fields_without_a_traceback(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("prune: {target_sparsity: 1.0, phases: 0}\nmodel: {arch: resnet9000}\n")
    r = ladle("run", str(spec), "--local")
    assert r.returncode == 2
    assert "prune.target_sparsity" in r.stderr and "prune.phases" in r.stderr and "model.arch" in r.stderr
    assert "Traceback" not in r.stderr
    r = ladle("run", str(tmp_path / "missing.yaml"), "--local")
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_run_local_with_a_search_runs_every_trial_and_records_the_choice(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: search\ndense: {epochs: 2}\nprune: {target_sparsity: 0.5, phases: 1}\n"
                    "retrain: {epochs: 2}\nsoup: {ingredients: 2}\n"
                    "search: {space: {lr: {choice: [0.001, 0.05]}}, trials: 3}\n")
    out = tmp_path / "out"
    r = ladle("run", str(spec), "--local", "--out", str(out))
    assert r.returncode == 0, r.stderr
    runs = json.loads((out / "summary.json").read_text())["runs"]
    trials = [run for run in runs if run["kind"] == "search_trial"]
    assert len(trials) == 3 and all(t["metrics"]["epochs_run"] == 2 for t in trials)   # no ASHA without Ray
    [chosen] = [t for t in trials if t["metrics"]["chosen"]]
    assert chosen["metrics"]["val_accuracy"] == max(t["metrics"]["val_accuracy"] for t in trials)
    ingredients = [run for run in runs if run["kind"] == "ingredient"]
    assert {i["config"]["lr"] for i in ingredients} == {chosen["config"]["lr"]}


TINY = {"dense": {"epochs": 2}, "prune": {"target_sparsity": 0.5, "phases": 1}, "retrain": {"epochs": 1},
        "soup": {"ingredients": 2}}


@pytest.fixture(scope="module")
def two_jobs(ray_head, tmp_path_factory):
    """A live server (real store, the session's Ray) with two small finished digits jobs."""
    with make_server(tmp_path_factory.mktemp("cli"), ray_head) as server:
        with Client(server.url) as c:
            ids = [c.submit(dict(TINY, name=name))["id"] for name in ("cmp-a", "cmp-b")]
            server.jobs = [c.wait(i, progress=False, poll=0.5, timeout=300) for i in ids]
        assert [j["status"] for j in server.jobs] == ["succeeded"] * 2, [j["error"] for j in server.jobs]
        yield server


@pytest.mark.slow
def test_compare_prints_both_jobs_per_phase(two_jobs):
    a, b = (j["id"] for j in two_jobs.jobs)
    r = ladle("compare", a, b, "--url", two_jobs.url, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [item["job"]["id"] for item in out] == [a, b]
    assert all([p["index"] for p in item["phases"]] == [0, 1] for item in out)
    with Client(two_jobs.url) as c:
        assert out == c.compare([a, b])                    # --json prints the SDK's list
    r = ladle("compare", a, b, "--url", two_jobs.url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for item in out:
        name, last = item["job"]["name"], item["phases"][-1]
        assert any(line.split()[:4] == [name, "0", "0.000", f"{100 * item['phases'][0]['soup_accuracy']:.2f}"]
                   for line in lines)                                              # its phase 0 row
        assert any(line.split()[:3] == ["1", "0.500", f"{100 * last['soup_accuracy']:.2f}"] for line in lines)
        summary = next(line for line in lines if line.startswith(f"{name} {item['job']['id'][:8]}: succeeded"))
        assert f"soup {100 * last['soup_accuracy']:.2f}%" in summary and "wall " in summary


@pytest.mark.slow
def test_compare_needs_two_known_jobs(two_jobs):
    a, b = (j["id"] for j in two_jobs.jobs)
    r = ladle("compare", a, "--url", two_jobs.url)
    assert r.returncode == 2 and "at least two job ids" in r.stderr and "Traceback" not in r.stderr
    r = ladle("compare", a, "no-such-job", b, "--url", two_jobs.url)
    assert r.returncode == 1 and "job no-such-job not found" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    with Client(two_jobs.url) as c:
        for bad in ("no-such-job", "a/b", ""):
            with pytest.raises(NotFound, match=f"job '?{bad}'? not found"):
                c.compare([a, bad])


@pytest.mark.slow
def test_logs_follow_prints_every_event_of_an_ended_job_and_returns(two_jobs):
    job_id = two_jobs.jobs[0]["id"]
    with Client(two_jobs.url) as c:
        events = c.events(job_id)
    assert events
    for args in ((), ("-f",)):
        r = ladle("logs", job_id, *args, "--url", two_jobs.url, "--json")
        assert r.returncode == 0, r.stderr
        assert [json.loads(line) for line in r.stdout.splitlines()] == events
    r = ladle("logs", job_id, "-f", "--url", two_jobs.url)
    assert r.returncode == 0, r.stderr
    assert all(" ".join(e["message"].split()) in " ".join(r.stdout.split()) for e in events)   # rich may wrap
    r = ladle("logs", "no-such-job", "-f", "--url", two_jobs.url)
    assert r.returncode == 1 and "job no-such-job not found" in r.stderr and "Traceback" not in r.stderr
