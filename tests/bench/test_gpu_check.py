"""bench/gpu_check.py stays runnable: its every section on the CPU at tiny sizes (the same code paths
the GPU run takes), and on CUDA where there is one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path, *args) -> dict:
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "gpu_check.py"), "--small",
                        "--out", str(out), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_runs_on_the_cpu(tmp_path):
    report = run(tmp_path, "--device", "cpu")
    sections = {r["section"] for r in report["rows"]}
    assert sections == {"cnn", "lm", "2:4", "agreement"}
    assert all(r["ok"] for r in report["rows"])
    soup = next(r for r in report["rows"] if r["name"].startswith("greedy soup"))
    assert soup["figures"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_section_runs_on_cuda_and_agrees_with_the_cpu(tmp_path):
    report = run(tmp_path, "--device", "cuda")
    assert all(r["ok"] for r in report["rows"]), [r for r in report["rows"] if not r["ok"]]
    assert any(r["section"] == "agreement" and r["name"].startswith("training") for r in report["rows"])
