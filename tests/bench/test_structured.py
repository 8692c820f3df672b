"""bench/structured.py --quick end to end (tiny CNNs and a tiny LLaMA, short timers), so that it cannot rot:
it writes its JSON with every row, the masked and the shrunk models computed the same outputs, and the
report says whether the goal figures hold. Timing itself is not checked."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_structured", ROOT / "bench" / "structured.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_quick_run_writes_every_row_and_masked_equals_shrunk(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "structured.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 60
    data = json.loads((tmp_path / "structured.json").read_text())
    assert (tmp_path / "structured.md").read_text().startswith("`python bench/structured.py --quick")

    cnn = data["cnn_rows"]
    assert {(r["model"], r["share"], r["batch"]) for r in cnn} == {
        (m, s, b) for m in ("resnet20", "resnet56", "vgg16_bn") for s in (0.3, 0.5, 0.7) for b in (1, 4)}
    for r in cnn:
        assert r["masked_equals_shrunk"] and r["max_diff"] <= 1e-3
        assert r["eager_dense_ms"] > 0 and r["eager_pruned_ms"] > 0 and r["ort_dense_ms"] > 0 and r["ort_pruned_ms"] > 0
        assert r["eager_speedup"] == pytest.approx(r["eager_dense_ms"] / r["eager_pruned_ms"])
        assert r["param_ratio"] > 1 and r["mac_ratio"] > 1         # the shrunk model is smaller
        assert 0 < r["channels_removed"] < r["channels"]

    lm = data["lm_rows"]
    assert {(r["variant"], r["mode"]) for r in lm} == {(v, m) for v in ("mlp50", "mlp50+kv")
                                                       for m in ("decode", "prefill")}
    for r in lm:
        assert r["masked_equals_shrunk"] and r["max_diff_prefill"] <= 1e-3 and r["max_diff_decode"] <= 1e-3
        assert r["neurons_removed_per_layer"] == 32
        assert r["kv_groups_removed_per_layer"] == (1 if r["variant"] == "mlp50+kv" else 0)
        assert r["dense_tokens_per_s"] > 0 and r["pruned_tokens_per_s"] > 0 and r["param_ratio"] > 1
        assert r["speedup_median"] > 0 and r["calls"] >= 1
    verdict = "\n".join(data["verdict"])
    assert "Goal ResNet-56, 50 % channels, PyTorch eager, batch 1" in verdict
    assert "Goal ResNet-56, 50 % channels, ONNX Runtime, batch 4" in verdict
    assert "50 % MLP neurons removed, batch-1 decoding" in verdict


def test_goals_say_plainly_whether_they_hold(bench):
    cnn = [{"model": "resnet56", "share": 0.5, "batch": 1, "eager_speedup": 2.0, "ort_speedup": 1.5,
            "mac_ratio": 3.9, "param_ratio": 4.0}]
    lm = [{"model": "SmolLM2-135M shape", "variant": "mlp50", "mode": "decode", "batch": 1, "speedup": 1.1,
           "dense_tokens_per_s": 10.0, "pruned_tokens_per_s": 11.0, "mac_ratio": 1.4}]
    lines = bench.goals(cnn, lm)
    assert lines[0].startswith("Goal ResNet-56, 50 % channels, PyTorch eager, batch 1: >= 1.8x faster: holds (2.00x")
    assert "ONNX Runtime, batch 1: >= 1.8x faster: DOES NOT HOLD (1.50x" in lines[1]
    assert "batch-1 decoding: >= 1.3x tokens/s: DOES NOT HOLD (1.10x" in lines[2]


def test_bad_arguments_are_refused(bench):
    for argv in (["--models", "vgg9000"], ["--shares", "1.5"], ["--prefill", "8"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
