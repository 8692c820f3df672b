"""bench/structured_soups.py on digits with an MLP (--quick), so that it cannot rot: both jobs run, the
unstructured one keeps exactly the parameter count of the channel-pruned one, and the report is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_accuracy_bench_compares_at_equal_parameter_count(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "structured_soups.py"), "--data", "digits",
                          "--arch", "mlp", "--seeds", "1", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "structured-soups.json").read_text())["results"]
    [ch], [un] = data["channels"], data["unstructured"]
    assert ch["parameters"] == un["parameters"] < ch["dense_parameters"]
    assert ch["macs"] < ch["dense_macs"] == un["macs"]
    assert "At equal parameter count" in (tmp_path / "structured-soups.md").read_text()
