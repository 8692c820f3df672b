"""prune.structure channels through the pipeline (sequential executor, SQLite store) on real data (digits) and
on a tiny LLaMA: whole channels / neurons / KV groups leave, ingredients and soups keep every removed group
exactly zero, a resumed phase reuses its ingredients, and the exports come out physically smaller with the
masked model's outputs."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from service.artifacts import ArtifactStore
from service.executors import SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import DBRecorder
from service.spec import parse_spec
from workers.checkpoint import load
from workers.export import compact_bytes, export_bytes, load_compact, onnx_bytes
from workers.models import build_model
from workers.structured import channel_groups, removed_channels

pytestmark = pytest.mark.slow

CHANNELS = {"name": "ch", "model": {"arch": "resnet20", "kwargs": {"width": 0.5}},
            "data": {"batch_size": 64, "val_fraction": 0.1}, "dense": {"epochs": 3, "lr": 0.1},
            "prune": {"structure": "channels", "target_sparsity": 0.5, "phases": 2, "robustness": [0.3, 0.6]},
            "retrain": {"epochs": 1, "schedule": "llr"}, "soup": {"ingredients": 2, "method": "greedy"}}


class DiesBeforeTheSoup(SequentialExecutor):
    """A driver that dies at phase 2's soup step, its ingredients trained and recorded."""

    def run(self, tasks, on_epoch, on_result=None):
        if any(t.name == "phase2/soup" for t in tasks):
            raise RuntimeError("driver died")
        return super().run(tasks, on_epoch, on_result)


class MustNotRetrain(SequentialExecutor):
    def run(self, tasks, on_epoch, on_result=None):
        assert not [t.name for t in tasks if "ingredient" in t.name], "a finished ingredient was retrained"
        return super().run(tasks, on_epoch, on_result)


def _model(ckpt):
    info = ckpt.info
    m = build_model(info.arch, num_classes=info.num_classes, in_shape=info.in_shape, **info.model_kwargs)
    m.load_state_dict(ckpt.state)
    return m.eval(), torch.zeros(1, *info.in_shape)


@pytest.fixture(scope="module")
def channel_job(tmp_path_factory):
    """The job run to its end: its driver dies at phase 2's soup, the job resumes there."""
    from service.driver import resume_point
    from service.store import Store
    tmp = tmp_path_factory.mktemp("channels")
    store = Store(f"sqlite:///{tmp}/ladle.db")
    spec = parse_spec(CHANNELS)
    job = store.create_job(spec)
    artifacts = ArtifactStore(str(tmp / "artifacts"))
    with pytest.raises(RuntimeError, match="driver died"):
        Pipeline(spec, DiesBeforeTheSoup(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}").run()
    resume = resume_point(store, job.id)
    assert sorted(resume.ingredients) == ["phase2/ingredient0", "phase2/ingredient1"]
    result = Pipeline(spec, MustNotRetrain(), DBRecorder(store, job.id), artifacts, prefix=f"jobs/{job.id}",
                      resume=resume).run()
    yield store, job, result
    store.engine.dispose()


def test_channel_phases_remove_whole_channels_and_soups_keep_them_zero(channel_job):
    store, job, result = channel_job
    dense, *phases = result.phases
    assert dense.metrics["soup_accuracy"] > 0.5
    for p in phases:
        m = p.metrics
        assert m["channels_removed"] == pytest.approx(p.target_sparsity, abs=0.02)
        assert 0 < m["macs_share"] < 1 - 0.5 * p.target_sparsity        # MACs fall faster than channels
        assert m["soup_accuracy"] > 0.3                                # well above chance (0.1)
        row = next(r for r in store.phases(job.id) if r.index == p.phase)
        pruned, soup = load(store.get_model(row.pruned_model_id).uri), load(store.get_model(p.model_id).uri)
        model, x = _model(soup)
        groups, protected = channel_groups(model, x)
        assert protected == ("fc",)
        gone = removed_channels(pruned.masks, groups)
        assert sum(map(len, gone.values())) == round(m["channels_removed"] * sum(g.size for g in groups))
        assert removed_channels(soup.masks, groups) == gone                    # the soup has the pruned mask
        zero = removed_channels(soup.state, groups)                            # and its weights: whole groups zero
        assert all(set(chs) <= set(zero.get(root, ())) for root, chs in gone.items())
        for ing in (r for r in store.runs(job.id, kind="ingredient") if r.phase == p.phase):
            state = load(store.get_model(ing.model_id).uri).state
            z = removed_channels(state, groups)
            assert all(set(chs) <= set(z.get(root, ())) for root, chs in gone.items())
    soup = store.get_model(result.final_model_id)
    s = soup.metrics["structure"]
    assert s["parameters"] < s["dense_parameters"] and s["macs"] < s["dense_macs"]
    events = [e.message for e in store.events(job.id)]
    assert any("removing that share of the channels" in e for e in events)
    assert any("of the channels removed: the model without them has" in e for e in events)


def test_a_resumed_channel_phase_reuses_its_ingredients(channel_job):
    store, job, _ = channel_job
    runs = [r for r in store.runs(job.id, kind="ingredient") if r.phase == 2]
    assert len(runs) == 2 and all(r.attempts == 1 and r.status == "succeeded" for r in runs)


def test_channel_exports_are_smaller_and_compute_what_the_masked_model_does(channel_job):
    import onnxruntime as ort
    store, job, result = channel_job
    rec = store.get_model(result.final_model_id)
    ckpt = load(rec.uri)
    model, _ = _model(ckpt)
    x = torch.randn(4, *ckpt.info.in_shape)
    with torch.no_grad():
        want = model(x).numpy()
    compact = load_compact(compact_bytes(ckpt))
    assert sum(p.numel() for p in compact.parameters()) == rec.metrics["structure"]["parameters"]
    with torch.no_grad():
        np.testing.assert_allclose(compact(x).numpy(), want, atol=1e-4)
    data = onnx_bytes(ckpt)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], want, atol=1e-4)
    import onnx
    inits = {i.name: int(np.prod(i.dims)) for i in onnx.load_from_string(data).graph.initializer}
    weights = [n for n in ckpt.masks if n in inits]
    assert len(weights) == len(ckpt.masks)                                   # every conv/linear weight, smaller
    assert sum(inits[n] for n in weights) < 0.8 * sum(ckpt.masks[n].numel() for n in weights)


def test_compact_is_refused_for_a_model_pruned_weight_by_weight(tmp_path):
    from workers.checkpoint import Checkpoint
    from workers.export import ExportError
    m = build_model("mlp", num_classes=10, in_shape=(1, 8, 8))
    ckpt = Checkpoint(state=m.state_dict(), meta={"arch": "mlp", "num_classes": 10, "in_shape": [1, 8, 8],
                                                  "spec": {"prune": {"structure": "unstructured"}}})
    with pytest.raises(ExportError, match="compact format is for models pruned with prune.structure channels"):
        export_bytes(ckpt, "compact")


def test_a_channel_lm_job_exports_a_smaller_hf_model_with_the_masked_logits(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from service.store import Store
    from workers.lm.model import load_causal_lm
    arch, text = tiny_lm
    store = Store(f"sqlite:///{tmp_path / 'ladle.db'}")
    spec = parse_spec({"name": "lm", "model": {"arch": arch},
                       "data": {"name": "text", "path": text, "seq_len": 16, "calibration_samples": 8, "batch_size": 8},
                       "prune": {"structure": "channels", "target_sparsity": 0.5, "phases": 1, "criterion": "wanda"},
                       "retrain": {"epochs": 1, "params": "bias_norm", "lr": 3e-3}, "soup": {"ingredients": 2}})
    job = store.create_job(spec)
    result = Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), ArtifactStore(str(tmp_path)),
                      prefix=f"jobs/{job.id}").run()
    _, phase = result.phases
    assert phase.metrics["channels_removed"] == pytest.approx(0.5, abs=0.02)   # 32 of 64 neurons, 1 of 2 KV groups
    ckpt = load(store.get_model(result.final_model_id).uri)
    masked, _ = load_causal_lm(arch)
    masked.load_state_dict(ckpt.state)
    folder = tmp_path / "hf"
    with zipfile.ZipFile(io.BytesIO(export_bytes(ckpt, "hf"))) as z:
        z.extractall(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] == 32 and config["num_key_value_heads"] == 1
    assert config["num_attention_heads"] == 2 and config["ladle_sparsity"]["structure"] == "channels"
    small = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, small.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, masked.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())


def test_sfw_with_a_group_constraint_trains_a_dense_model_measured_over_channel_shares(tmp_path):
    """dense.sfw.constraint group_k_support (whole output filters) with prune.structure channels: the dense
    model's one-shot robustness curve removes shares of channels, and little is lost at half of them."""
    from service.recorders import LocalRecorder
    spec = parse_spec({"name": "sfw-groups", "model": {"arch": "mlp"}, "data": {"batch_size": 64},
                       "dense": {"epochs": 6, "lr": 0.3, "optimizer": "sfw",
                                 "sfw": {"constraint": "group_k_support", "k": 0.5, "radius_factor": 10}},
                       "prune": {"structure": "channels", "target_sparsity": 0.5, "phases": 1,
                                 "robustness": [0.25, 0.5]},
                       "retrain": {"epochs": 1}, "soup": {"ingredients": 2}})
    rec = LocalRecorder(progress=False, quiet=True)
    result = Pipeline(spec, SequentialExecutor(), rec, ArtifactStore(str(tmp_path))).run()
    dense = next(m for m in rec.models if m["kind"] == "dense")
    points = dense["metrics"]["robustness"]
    assert [p["sparsity"] for p in points] == [0.25, 0.5]
    acc = result.phases[0].metrics["soup_accuracy"]
    assert acc > 0.5 and points[-1]["accuracy"] > acc - 0.15          # half the channels gone, one shot
    assert load(dense["uri"]).meta["dense_optimizer"]["constraint"] == "group_k_support"
    assert any("removing that share of the channels" in e["message"] for e in rec.events)
