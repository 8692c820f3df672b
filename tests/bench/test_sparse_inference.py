"""bench/sparse_inference.py on tiny sizes, so that it cannot rot: its sparse models compute the dense
outputs (timing is not checked), its report says where sparse is slower, and `--model-id` records
`metrics.inference` for a stored model in the store (a temp SQLite store, a real digits job)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from service.artifacts import ArtifactStore
from service.executors import SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import DBRecorder
from service.spec import parse_spec
from service.store import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sparse_inference", ROOT / "bench" / "sparse_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module               # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("model", ["mlp", "resnet20", "transformer"])
def test_core_functions_on_tiny_models_give_dense_outputs(bench, model):
    [case] = bench.zoo_cases([model], (1, 3), (1, 2), quick=True)
    for what in ("0.9", "2:4"):
        pruned, masks = case.prune(what)
        for layout in ("csr", "bsr"):
            sparse, left = bench.sparsify(pruned, layout, names=masks)
            assert left == {}
            x = case.make_input(3 if model != "transformer" else 2)
            diff, scale = bench.max_abs_diff(pruned, sparse, x)
            assert diff <= 1e-4 * scale + 1e-5
        rows = bench.run_case(case, what, min_run_time=0.001, rounds=1, log=lambda _: None)
        assert [r.batch for r in rows] == list(case.batch_sizes)
        for r in rows:
            assert r.dense_ms > 0 and set(r.sparse_ms) == {"csr", "bsr"} and all(v > 0 for v in r.sparse_ms.values())
            assert r.max_diff <= 1e-3
            expected = 0.5 if what == "2:4" else 0.9
            assert r.actual_sparsity == pytest.approx(expected, abs=0.1)
    table = bench.table(rows, ("csr", "bsr"))
    assert table[0][:4] == ["model", "sparsity", "batch", "dense ms"] and len(table) == 1 + len(rows)


def test_check_same_outputs_refuses_a_wrong_model(bench):
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with pytest.raises(AssertionError, match="differs from dense"):
        bench.check_same_outputs(a, b, torch.randn(2, 4))


def test_the_verdict_names_where_sparse_is_slower(bench):
    rows = [bench.Row("m", "90%", 0.9, 1, 1.0, {"csr": 2.0}, {"csr": 0.3}, 0.0),
            bench.Row("m", "90%", 0.9, 32, 1.0, {"csr": 0.5}, {"csr": 0.3}, 0.0),
            bench.Row("m", "50%", 0.5, 1, 1.0, {"csr": 3.0}, {"csr": 1.5}, 0.0)]
    lines = bench.verdict(rows, ("csr",))
    assert lines[0] == ("m, CSR: SLOWER than dense at 90% at batch 1 (2.00x), 50% at batch 1 (3.00x); "
                        "faster only at 90% at batch 32 (0.50x).")
    assert "larger than dense at m 50%" in lines[1]


def test_bad_arguments_are_refused(bench, capsys):
    for argv in (["--patterns", "4:2"], ["--layouts", "coo"], ["--batch-sizes", "0"], ["--sparsities", "1.5"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert bench.main(["--models", "vgg9000", "--quick"]) == 1
    assert "unknown models" in capsys.readouterr().err


def test_model_id_times_a_stored_model_against_its_dense_ancestor_and_records_it(bench, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'ladle.db'}"
    store = Store(url)
    spec = parse_spec({"name": "b", "data": {"batch_size": 128}, "dense": {"epochs": 1},
                       "prune": {"target_sparsity": 0.9, "phases": 1}, "retrain": {"epochs": 1},
                       "soup": {"ingredients": 1, "min_ingredients": 1}})
    job = store.create_job(spec)
    result = Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), ArtifactStore(str(tmp_path / "art")),
                      prefix=f"jobs/{job.id}").run()
    soup_id = result.final_model_id
    dense_id = store.phases(job.id)[0].model_id
    assert bench.dense_ancestor(store.lineage(soup_id), soup_id) == dense_id

    code = bench.main(["--model-id", soup_id, "--database-url", url, "--batch-sizes", "1,4",
                       "--min-run-time", "0.001", "--rounds", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "recorded as metrics.inference" in out
    metrics = Store(url, migrate=False).get_model(soup_id).metrics
    inference = metrics["inference"]
    assert set(inference) == {"device", "layout", "dense_ms", "sparse_ms", "latency_ratio", "batch_size",
                              "measured_at", "command"}
    assert inference["device"] == "cpu" and inference["layout"] == "csr" and inference["batch_size"] == 4
    assert inference["dense_ms"] > 0 and inference["sparse_ms"] > 0
    assert inference["latency_ratio"] == pytest.approx(inference["sparse_ms"] / inference["dense_ms"], rel=1e-2)
    assert inference["command"].startswith("python bench/sparse_inference.py")
    assert "layer_sparsity" in metrics                  # merged, not replaced

    # the dense model itself, and an unknown id, are refused with a message and exit code 1
    assert bench.main(["--model-id", dense_id, "--database-url", url]) == 1
    assert "dense model itself" in capsys.readouterr().err
    assert bench.main(["--model-id", "no-such-model", "--database-url", url]) == 1
    assert "not found" in capsys.readouterr().err


def test_layers_section_times_single_linear_layers_dense_against_csr(bench):
    rows = bench.layer_rows(((48, 128), (128, 48)), (0.9, 0.98), (1, 3), min_run_time=0.001, rounds=1,
                            log=lambda _: None)
    assert [(r.model.split(" (")[0], r.sparsity, r.batch) for r in rows] == [
        (f"linear {i}->{o}", s, t) for i, o in ((48, 128), (128, 48)) for t in (1, 3) for s in ("90%", "98%")]
    for r in rows:
        assert r.max_diff <= 1e-4 and r.dense_ms > 0 and r.sparse_ms["csr"] > 0
        assert r.actual_sparsity == pytest.approx(float(r.sparsity.rstrip("%")) / 100, abs=0.01)
    # one dense baseline per layer and input, shared by every sparsity
    assert len({(r.model, r.batch, r.dense_ms) for r in rows}) == 4
    lines = bench.layer_verdict(rows)
    assert len(lines) == 4 and lines[0].startswith("linear 48->128, 1 token (batch-1 decoding): CSR is")
