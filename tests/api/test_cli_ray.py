"""`ladle run job.yaml` without --local: the embedded service (SQLite, a local Ray head started and
stopped by the command, the dispatcher) runs the job as a Ray job and prints the phase table."""

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

LADLE = str(Path(sys.executable).with_name("ladle"))


@pytest.mark.slow
def test_run_on_ray_with_the_embedded_service(tmp_path):
    (tmp_path / "job.yaml").write_text("name: ray-cli\ndense: {epochs: 3}\nprune: {target_sparsity: 0.75, phases: 2}\n"
                                       "retrain: {epochs: 1}\nsoup: {ingredients: 2}\n")
    r = subprocess.run([LADLE, "run", "job.yaml", "--json"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["job"]["status"] == "succeeded"
    assert [p["index"] for p in out["phases"]] == [0, 1, 2]
    assert out["phases"][2]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    # the store under ./.ladle holds the job, its lineage and its metrics
    engine = sa.create_engine(f"sqlite:///{tmp_path / '.ladle' / 'ladle.db'}")
    with engine.connect() as c:
        assert c.execute(sa.text("select count(*) from models")).scalar() == 1 + 2 * 4
        assert c.execute(sa.text("select count(*) from model_edges")).scalar() == 2 * 5
        assert c.execute(sa.text("select count(distinct run_id) from metrics")).scalar() == 1 + 2 * 2
    # the local Ray head was on loopback and was stopped with the command
    url = re.search(r"submitted to Ray at (http://127\.0\.0\.1:\d+)", r.stderr).group(1)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/api/version", timeout=3)


@pytest.mark.slow
def test_demo_through_the_service(tmp_path):
    """`make demo` runs `ladle demo` (here its quick --small job on digits: 4 ingredients of 5 epochs): the
    embedded service, the soup job and plain IMP from the same dense model at 5 and at 4 · 5 = 20 epochs per
    phase through the SDK, the table, a verdict per phase, what each job cost and which IMP the soup beats."""
    r = subprocess.run([LADLE, "demo", "--small", "--no-serve", "--port", "0"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert rows[3][1] == "0.900"
    verdicts = re.findall(r"phase (\d) \(([\d.]+)% of the weights pruned\): the soup of 4 scores ([\d.]+)%, [\d.]+ pp "
                          r"(?:above|below|level with) its best ingredient \(([\d.]+)%\); the 4 models' prediction "
                          r"ensemble ([\d.]+)%; [\d.]+ pp (?:above|below|level with) IMP at 5 epochs per phase "
                          r"\(([\d.]+)%\); [\d.]+ pp (?:above|below|level with) IMP at 20 epochs per phase \(([\d.]+)%\)",
                          r.stdout)
    assert [v[0] for v in verdicts] == ["1", "2", "3"], r.stdout
    assert float(verdicts[2][1]) == pytest.approx(90.0, abs=0.05)
    assert all(float(v[2]) > 80 and float(v[5]) > 80 and float(v[6]) > 80 for v in verdicts)   # all well above chance
    costs = re.findall(r"^  (soup of 4 × 5 epochs|IMP at 5 epochs per phase|IMP at 20 epochs per phase): wall ([\d.]+) s, "
                       r"([\d.]+) CPU-seconds, (\d+) epochs trained$", r.stdout, re.M)
    assert [c[0] for c in costs] == ["soup of 4 × 5 epochs", "IMP at 5 epochs per phase", "IMP at 20 epochs per phase"]
    dense_epochs = 20
    assert [int(c[3]) for c in costs] == [dense_epochs + 3 * 4 * 5, 3 * 5, 3 * 20]    # IMP reuses the dense model
    assert all(float(c[1]) > 0 and float(c[2]) > 0 for c in costs)
    short = re.search(r"In short: at 90\.0% sparsity the soup \(([\d.]+)%\) (.*)$", r.stdout, re.M)
    soup, imp5, imp20 = float(verdicts[2][2]), float(verdicts[2][5]), float(verdicts[2][6])
    assert float(short.group(1)) == soup
    said = {part.split(" ", 1)[0] if part.startswith("beats") else "does not beat": part
            for part in short.group(2).split("; ")}                   # "beats A and B", "does not beat C or D"
    for label, acc in (("IMP at 5 epochs per phase", imp5), ("IMP at 20 epochs per phase", imp20)):
        if soup != acc:                                                # the plain answer matches the numbers
            assert f"{label} ({acc:.2f}%)" in said["beats" if soup > acc else "does not beat"], short.group(0)
    assert "final model" in r.stdout and "ladle compare" in r.stdout
