"""Export formats through the API, in-process (TestClient on a temp SQLite store, no Ray): every format of
GET /models/{id}/download?format= arrives with its checksum through the route, the SDK (Client.export) and
the CLI (`ladle export`), loads as what it claims to be, is cached beside the model and recorded in its
metrics; a format that does not fit the model, or none that exists, is a 422 naming why; another user's
model stays a 404."""

import hashlib
import json
import uuid

import numpy as np
import pytest
import torch

from api.client import InvalidSpec, NotFound
from api.routes.models import CorruptArtifact
from service.recorders import DBRecorder
from service.records import ModelRecord
from tests.api.test_routes import sdk
from workers.checkpoint import load, save_model
from workers.export import from_sparse_bytes
from workers.models import build_model
from workers.pruning import full_masks, prune

IMAGE_JOB = {"name": "cnn", "model": {"arch": "lenet5"}, "dense": {"epochs": 1}, "prune": {"target_sparsity": 0.9,
             "phases": 1}, "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}


def store_model(api, job_id: str, model: torch.nn.Module, masks, meta: dict, kind: str = "soup") -> ModelRecord:
    """Save `model` as the pipeline does (workers.checkpoint.save_model) and record it for the job."""
    model_id = uuid.uuid4().hex
    meta = dict(meta, model_id=model_id, kind=kind, phase=1, name=f"phase1/{kind}",
                parents=[{"id": "parent-id", "kind": "averaged_from"}])
    url = str(api.runtime.settings.artifacts) + f"/jobs/{job_id}/phase1/{kind}.safetensors"
    saved = save_model(url, model, masks, meta)
    rec = ModelRecord(id=model_id, kind=kind, phase=1, name=meta["name"], uri=saved.uri, size_bytes=saved.size_bytes,
                      sha256=saved.sha256, sparsity=saved.sparsity, nonzeros=saved.nonzeros, metrics={}, parents=[])
    DBRecorder(api.store, job_id).model_saved(rec)
    return rec


def submit(api, spec: dict, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = api.post("/jobs", json=spec, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def image_model(api, token: str | None = None) -> ModelRecord:
    """A LeNet-5 for digits (1x8x8), 90 % pruned, stored as a new job's soup."""
    return stored_cnn(api, submit(api, IMAGE_JOB, token))


def stored_cnn(api, job_id: str) -> ModelRecord:
    """A LeNet-5 for digits (1x8x8), 90 % pruned, stored as the soup of the job `job_id` (of IMAGE_JOB);
    `api`: anything with `.store` and `.runtime.settings` (a TestClient of the app, a live server)."""
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_shape=(1, 8, 8))
    r = prune(model, full_masks(model), 0.9, scope="global", criterion="magnitude", seed=0)
    meta = {"arch": "lenet5", "model_kwargs": {}, "num_classes": 10, "in_shape": [1, 8, 8], "job": "cnn",
            "spec": api.store.get_job(job_id).spec}
    return store_model(api, job_id, r.model, r.masks, meta)


@pytest.fixture
def cnn(api):
    return image_model(api)


@pytest.fixture
def llm(api, tiny_lm):
    """The tiny LLaMA with its blocks' weights half pruned (magnitude per tensor), stored as an LM job's soup."""
    from workers.lm.task import lm_masks
    from workers.lm.model import load_causal_lm
    arch, text = tiny_lm
    spec = {"name": "lm", "model": {"arch": arch}, "data": {"name": "text", "path": text, "seq_len": 16},
            "prune": {"target_sparsity": 0.5, "phases": 1, "criterion": "magnitude"},
            "retrain": {"epochs": 1, "params": "bias_norm"}, "soup": {"ingredients": 2}}
    job_id = submit(api, spec)
    model, _ = load_causal_lm(arch)
    masks = lm_masks(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in masks:
            w = params[name]
            masks[name] = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
            w.mul_(masks[name])
    meta = {"arch": arch, "model_kwargs": {}, "task": "causal_lm", "seq_len": 16, "job": "lm",
            "spec": api.store.get_job(job_id).spec}
    rec = store_model(api, job_id, model, masks, meta)
    rec.model = model
    return rec


def fetch(api, model_id: str, fmt: str):
    r = api.get(f"/models/{model_id}/download", params={"format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["x-checksum-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert int(r.headers["content-length"]) == len(r.content)
    return r


def test_each_image_format_downloads_with_its_checksum_and_loads(api, cnn, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    assert api.get(f"/models/{cnn.id}").json()["sizes"] == {"dense": cnn.size_bytes}
    dense = fetch(api, cnn.id, "dense")
    assert dense.content == fetch(api, cnn.id, "dense").content == open(cnn.uri, "rb").read()
    assert api.get(f"/models/{cnn.id}/download").content == dense.content           # dense is the default
    stored = load(cnn.uri)

    sparse = fetch(api, cnn.id, "sparse")
    assert 'filename="phase1-soup-' in sparse.headers["content-disposition"]
    back = from_sparse_bytes(sparse.content)
    assert set(back.state) == set(stored.state)
    assert all(torch.equal(back.state[k], stored.state[k]) for k in stored.state)
    assert all(torch.equal(back.masks[k], stored.masks[k]) for k in stored.masks)
    assert back.meta["model_id"] == cnn.id and back.meta["parents"][0]["id"] == "parent-id"

    onnx = fetch(api, cnn.id, "onnx")
    model = build_model("lenet5", num_classes=10, in_shape=(1, 8, 8))
    model.load_state_dict(stored.state)
    x = torch.randn(3, 1, 8, 8)
    [out] = ort.InferenceSession(onnx.content, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model.eval()(x).numpy(), atol=1e-4)

    # recorded: sizes per format (with their ratio to dense shown by the dashboard) and each export's sha256
    metrics = api.get(f"/models/{cnn.id}").json()["metrics"]
    assert metrics["sizes"] == {"dense": cnn.size_bytes, "sparse": len(sparse.content), "onnx": len(onnx.content)}
    assert metrics["export_sha256"] == {"sparse": sparse.headers["x-checksum-sha256"],
                                        "onnx": onnx.headers["x-checksum-sha256"]}
    assert api.get(f"/models/{cnn.id}").json()["sizes"] == metrics["sizes"]          # typed, on the model too
    assert metrics["sizes"]["sparse"] < 0.25 * cnn.size_bytes          # a small model: the header weighs in
    # cached next to the model, and served from there the next time
    cached = tmp_path / "artifacts" / "jobs"
    [path] = list(cached.rglob("soup.safetensors.sparse.safetensors"))
    mtime = path.stat().st_mtime_ns
    assert fetch(api, cnn.id, "sparse").content == sparse.content and path.stat().st_mtime_ns == mtime

    # the SDK and the CLI write the same files, checked against the header
    with sdk(api) as c:
        assert c.export(cnn.id, "sparse", tmp_path / "m.sparse.safetensors").read_bytes() == sparse.content
        assert c.export(cnn.id, "onnx", tmp_path / "m.onnx").read_bytes() == onnx.content
        assert c.export(cnn.id, "dense", tmp_path / "m.safetensors").read_bytes() == dense.content
    assert [p.name for p in tmp_path.glob(".*")] == []


def test_the_cli_exports_and_prints_one_line(api, cnn, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from api.cli import app, remote
    monkeypatch.setattr(remote, "_client", lambda url, token: sdk(api))
    out = tmp_path / "soup.sparse.safetensors"
    result = CliRunner().invoke(app, ["export", cnn.id, "--format", "sparse", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in " ".join(result.output.split()) and from_sparse_bytes(out.read_bytes()).masks
    result = CliRunner().invoke(app, ["export", cnn.id, "--format", "hf", "-o", str(tmp_path / "hf")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "hf format is for causal language models" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["export", cnn.id, "--format", "tflite", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "the formats are dense, sparse, hf, onnx" in " ".join(result.output.split())


def test_the_hf_export_of_an_llm_loads_with_from_pretrained_and_gives_the_stored_models_logits(api, llm, tmp_path,
                                                                                             monkeypatch):
    from transformers import AutoModelForCausalLM
    r = fetch(api, llm.id, "hf")
    assert r.headers["content-type"] == "application/zip" and r.content[:2] == b"PK"
    with sdk(api) as c:
        folder = c.export(llm.id, "hf", tmp_path / "soup-hf")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    recipe = config["ladle_sparsity"]
    assert recipe["model_id"] == llm.id and recipe["parent"] == "parent-id" and recipe["kind"] == "soup"
    assert recipe["prune"]["target_sparsity"] == 0.5 and recipe["sparsity"] == pytest.approx(0.5, abs=0.01)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, llm.model(input_ids=x).logits)
    # sparse works for LLMs too; onnx does not
    back = from_sparse_bytes(fetch(api, llm.id, "sparse").content)
    assert all(torch.equal(back.state[k], v) for k, v in llm.model.state_dict().items())
    sizes = api.get(f"/models/{llm.id}").json()["metrics"]["sizes"]
    assert set(sizes) == {"dense", "hf", "sparse"} and sizes["hf"] == len(r.content)
    # the CLI unpacks it into the -o folder, and refuses a folder that holds something
    from typer.testing import CliRunner

    from api.cli import app, remote
    monkeypatch.setattr(remote, "_client", lambda url, token: sdk(api))
    result = CliRunner().invoke(app, ["export", llm.id, "--format", "hf", "-o", str(tmp_path / "cli-hf")])
    assert result.exit_code == 0 and f"wrote {tmp_path / 'cli-hf'}/" in " ".join(result.output.split())
    assert sorted(p.name for p in (tmp_path / "cli-hf").iterdir()) == sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(app, ["export", llm.id, "--format", "hf", "-o", str(tmp_path / "cli-hf")])
    assert result.exit_code == 2 and "is not an empty folder" in " ".join(result.output.split())
    r = api.get(f"/models/{llm.id}/download", params={"format": "onnx"})
    [err] = r.json()["detail"]
    assert r.status_code == 422 and err["loc"] == ["query", "format"]
    assert "onnx format is for image models" in err["msg"] and "causal language model" in err["msg"]


def test_formats_that_do_not_fit_are_422_naming_why(api, cnn, tmp_path):
    r = api.get(f"/models/{cnn.id}/download", params={"format": "hf"})
    [err] = r.json()["detail"]
    assert r.status_code == 422 and err["loc"] == ["query", "format"]
    assert err["msg"].startswith("the hf format is for causal language models") and "'lenet5'" in err["msg"]
    r = api.get(f"/models/{cnn.id}/download", params={"format": "tflite"})
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert err["loc"] == ["query", "format"] and all(f"'{f}'" in err["msg"] for f in ("dense", "sparse", "hf", "onnx"))
    with sdk(api) as c:
        with pytest.raises(InvalidSpec, match="format: the hf format is for causal language models"):
            c.export(cnn.id, "hf", tmp_path / "hf")
        with pytest.raises(InvalidSpec, match="format: Input should be 'dense', 'sparse', 'hf', 'onnx' or 'compact'"):
            c.export(cnn.id, "tflite", tmp_path / "x")
        with pytest.raises(InvalidSpec, match="format: the compact format is an image model pruned with prune.structure "
                                              "channels.*this model keeps its shapes"):
            c.export(cnn.id, "compact", tmp_path / "c")
    assert list(tmp_path.glob("*hf*")) == [] and list(tmp_path.glob(".*")) == []


def test_the_sdk_knows_the_services_formats_and_their_suffixes():
    from api.client import EXPORT_FORMATS, EXPORT_SUFFIX
    from service.exports import FORMATS, SUFFIX
    assert EXPORT_FORMATS == FORMATS and EXPORT_SUFFIX == SUFFIX


def test_another_users_model_is_404_in_every_format(api_auth, tmp_path):
    api = api_auth
    _, alice = api.store.create_token("alice")
    _, bob = api.store.create_token("bob")
    model = image_model(api, alice)
    for fmt in ("dense", "sparse", "hf", "onnx"):
        r = api.get(f"/models/{model.id}/download", params={"format": fmt}, headers={"Authorization": f"Bearer {bob}"})
        assert r.status_code == 404 and r.json() == {"detail": f"model {model.id} not found"}
        r = api.get(f"/models/{model.id}/download", params={"format": fmt})
        assert r.status_code == 401
    with sdk(api, bob) as c, pytest.raises(NotFound):
        c.export(model.id, "sparse", tmp_path / "x")
    assert "sizes" not in api.store.get_model(model.id).metrics              # nothing was built for bob
    with sdk(api, alice) as c:
        assert from_sparse_bytes(c.export(model.id, "sparse", tmp_path / "a").read_bytes()).meta["model_id"] == model.id


def test_a_tampered_cached_export_is_not_sent_whole(api, cnn):
    fetch(api, cnn.id, "sparse")
    path = cnn.uri + ".sparse.safetensors"
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptArtifact, match="its sparse export does not match the store"):
        api.get(f"/models/{cnn.id}/download", params={"format": "sparse"})


def test_a_damaged_checkpoint_exports_nothing(api, cnn):
    data = bytearray(open(cnn.uri, "rb").read())
    data[-5] ^= 1
    open(cnn.uri, "wb").write(bytes(data))
    r = api.get(f"/models/{cnn.id}/download", params={"format": "sparse"})
    assert r.status_code == 500 and "does not match the store's size and sha256" in r.json()["detail"]


# ---------------------------------------------------------------- the dashboard's model page, in Chromium

from tests.api.test_web_hardening import live  # noqa: E402,F401  (uvicorn in a thread on the api fixture's app)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_the_model_page_shows_sizes_per_format_downloads_them_and_the_measured_latency(api, cnn, live):
    from playwright.sync_api import sync_playwright

    from tests.api.test_dashboard import CHROMIUM, FLAGS
    from tests.conftest import SCREENSHOTS
    api.store.add_model_metrics(cnn.id, inference={
        "device": "cpu", "layout": "csr", "dense_ms": 1.25, "sparse_ms": 0.5, "latency_ratio": 0.4,
        "batch_size": 32, "measured_at": "2026-11-24T04:00:00Z", "command": "python bench/latency.py"})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        errors = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{live.url}/#/models/{cnn.id}")
        table = page.locator("#exports table")
        table.wait_for(timeout=20_000)
        rows = {f: page.locator(f'#exports tr[data-format="{f}"]') for f in ("dense", "sparse", "onnx")}
        assert page.locator('#exports tr[data-format="hf"]').count() == 0          # an image model: no hf
        assert rows["dense"].locator(".ratio").inner_text() == "1.000×"
        assert "built on first download" in rows["sparse"].inner_text()
        assert page.locator("#latency-ratio").inner_text() == "0.40×"
        assert "python bench/latency.py" in page.locator("#inference").inner_text()
        with page.expect_download() as dl:
            rows["sparse"].locator("button").click()
        path = dl.value.path()
        assert dl.value.suggested_filename.endswith(".sparse.safetensors")
        assert from_sparse_bytes(open(path, "rb").read()).meta["model_id"] == cnn.id
        page.wait_for_function("() => !document.querySelector('#exports tr[data-format=\"sparse\"] .ratio')"
                               ".textContent.includes('–')", timeout=10_000)
        size = api.store.get_model(cnn.id).metrics["sizes"]["sparse"]
        assert rows["sparse"].locator(".ratio").inner_text() == f"{size / cnn.size_bytes:.3f}×"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "model-exports.png"), full_page=True)
        assert errors == [], errors
        browser.close()


def channel_cnn(api) -> ModelRecord:
    """A LeNet-5 for digits with half its channels removed (workers.structured), stored as the soup of a job
    with prune.structure channels, with the structure report the pipeline records."""
    from workers.structured import prune_channels, structure_report
    torch.manual_seed(0)
    job_id = submit(api, dict(IMAGE_JOB, prune={"structure": "channels", "target_sparsity": 0.5, "phases": 1}))
    model = build_model("lenet5", num_classes=10, in_shape=(1, 8, 8)).eval()
    x = torch.zeros(1, 1, 8, 8)
    r = prune_channels(model, None, 0.5, example_input=x, scope="layerwise")
    meta = {"arch": "lenet5", "model_kwargs": {}, "num_classes": 10, "in_shape": [1, 8, 8], "job": "cnn",
            "spec": api.store.get_job(job_id).spec}
    rec = store_model(api, job_id, r.model, r.masks, meta)
    api.store.add_model_metrics(rec.id, structure=structure_report(r.model, r.masks, x))
    rec.model = r.model
    return rec


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_a_channel_pruned_models_page_shows_its_structure_and_downloads_it_compact(api, live):
    from playwright.sync_api import sync_playwright

    from tests.api.test_dashboard import CHROMIUM, FLAGS
    from tests.conftest import SCREENSHOTS
    from workers.export import load_compact
    rec = channel_cnn(api)
    s = api.store.get_model(rec.id).metrics["structure"]
    assert s["channels_removed"] == pytest.approx(0.5, abs=0.05) and s["parameters"] < s["dense_parameters"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        errors = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{live.url}/#/models/{rec.id}")
        page.locator("#structure #macs-ratio").wait_for(timeout=20_000)
        assert page.locator("#channels-removed").inner_text() == f"{100 * s['channels_removed']:.1f}%"
        assert page.locator("#parameters-ratio").inner_text() == f"{s['parameters'] / s['dense_parameters']:.2f}×"
        assert page.locator("#macs-ratio").inner_text() == f"{s['macs'] / s['dense_macs']:.2f}×"
        row = page.locator('#exports tr[data-format="compact"]')
        with page.expect_download() as dl:
            row.locator("button").click()
        assert dl.value.suggested_filename.endswith(".compact.safetensors")
        small = load_compact(open(dl.value.path(), "rb").read())
        assert sum(p.numel() for p in small.parameters()) == s["parameters"]
        x = torch.randn(3, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(small(x), rec.model(x), atol=1e-5, rtol=1e-5)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "model-structure.png"), full_page=True)
        assert errors == [], errors
        browser.close()
    cnn = image_model(api)                   # a model pruned weight by weight has no compact row
    r = api.get(f"/models/{cnn.id}/download", params={"format": "compact"})
    assert r.status_code == 422 and "keeps its shapes" in r.json()["detail"][0]["msg"]


def test_an_llm_whose_base_folder_is_gone_is_503_saying_so(api):
    """The hf export rebuilds the model from its hf: folder; a server that cannot read it says why."""
    from service.orm import Job
    job_id = submit(api, IMAGE_JOB)
    with api.store.tx() as s:                    # an LLM job's spec as stored (hf: folders are checked at submission)
        job = s.get(Job, job_id)
        job.spec = dict(job.spec, model={"arch": "hf:/nowhere/at/all"})
    model = torch.nn.Linear(4, 2)
    rec = store_model(api, job_id, model, {"weight": torch.ones(2, 4, dtype=torch.bool)},
                      {"arch": "hf:/nowhere/at/all", "model_kwargs": {}, "task": "causal_lm"})
    r = api.get(f"/models/{rec.id}/download", params={"format": "hf"})
    assert r.status_code == 503 and "cannot be rebuilt for the hf export" in r.json()["detail"]
    assert "/nowhere/at/all" in r.json()["detail"] and "does not exist" in r.json()["detail"]
    assert "sizes" not in api.store.get_model(rec.id).metrics


def test_the_sdk_refuses_an_archive_with_a_member_outside_its_folder(tmp_path):
    import zipfile

    from api.client import DownloadError, unpack_zip
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("../escaped.txt", "x")
    with pytest.raises(DownloadError, match="member outside its folder: '../escaped.txt'"):
        unpack_zip(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.zip"]


def test_over_http_the_sdk_exports_with_its_checksum(api, cnn, live, tmp_path):
    from api.client import Client
    with Client(live.url) as c:
        path = c.export(cnn.id, "sparse", tmp_path / "soup.sparse.safetensors")
        assert from_sparse_bytes(path.read_bytes()).meta["model_id"] == cnn.id
        with pytest.raises(InvalidSpec, match="format: the hf format is for causal language models"):
            c.export(cnn.id, "hf", tmp_path / "hf")


def test_an_exporter_that_fails_is_a_503_saying_why_not_a_trace(api, cnn, monkeypatch):
    import torch.onnx

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operator: aten::strange")
    monkeypatch.setattr(torch.onnx, "export", broken)
    r = api.get(f"/models/{cnn.id}/download", params={"format": "onnx"})
    assert r.status_code == 503
    assert r.json()["detail"] == (f"the onnx export of model {cnn.id} failed "
                                  f"(RuntimeError: Unsupported operator: aten::strange)")
    assert "onnx" not in (api.store.get_model(cnn.id).metrics.get("sizes") or {})


def test_concurrent_onnx_exports_of_different_models_never_fail_each_other(api):
    # torch's ONNX exporter keeps process-wide state: two exports at once in one process failed one of them
    # (503). An exporter builds one at a time per process; every request gets its file.
    import threading
    models = [image_model(api) for _ in range(3)]
    answers = {}

    def fetch(m):
        answers[m.id] = api.get(f"/models/{m.id}/download", params={"format": "onnx"})
    threads = [threading.Thread(target=fetch, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {m.id: answers[m.id].status_code for m in models} == {m.id: 200 for m in models}
    for m in models:
        r = answers[m.id]
        assert hashlib.sha256(r.content).hexdigest() == r.headers["X-Checksum-Sha256"]
