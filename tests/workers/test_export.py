"""workers.export: the sparse safetensors format (bit-exact round trip for every zoo model and a tiny LLM,
its size at 90 % sparsity, a damaged file refused naming the problem), the hf folder (same logits as the
stored model, the recipe in its config) and ONNX (same outputs under onnxruntime, the mask's zeros kept)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from workers.checkpoint import Checkpoint, from_bytes, to_bytes
from workers.export import (ExportError, SparseFormatError, check_onnx_zeros, choose_layout, from_sparse_bytes,
                            hf_recipe, hf_zip, layout_bytes, onnx_bytes, onnx_initializers, save_hf, sparse_sizes,
                            to_sparse_bytes, zip_folder)
from workers.models import ZOO, build_model
from workers.pruning import full_masks, prune

SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28)}
KWARGS = {"vgg16_bn": {"width": 0.25}}        # a quarter of the width: the same layers, 16x fewer weights


def pruned_checkpoint(arch: str, sparsity: float = 0.9, seed: int = 0, in_shape=None) -> Checkpoint:
    """A zoo model pruned (global magnitude) to `sparsity`, as the pipeline saves it."""
    torch.manual_seed(seed)
    in_shape = in_shape or SHAPES.get(arch, (3, 16, 16))
    model = build_model(arch, num_classes=10, in_shape=in_shape, **KWARGS.get(arch, {}))
    r = prune(model, full_masks(model), sparsity, scope="global", criterion="magnitude", seed=seed)
    state = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
    meta = {"arch": arch, "model_kwargs": KWARGS.get(arch, {}), "num_classes": 10, "in_shape": list(in_shape),
            "model_id": f"{arch}-id", "kind": "pruned", "phase": 1, "name": "phase1/pruned",
            "parents": [{"id": "dense-id", "kind": "pruned_from"}], "spec": {"prune": {"target_sparsity": sparsity}}}
    return Checkpoint(state=state, masks=r.masks, meta=meta)


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert set(a.state) == set(b.state) and set(a.masks) == set(b.masks)
    for k in a.state:
        assert a.state[k].dtype == b.state[k].dtype and a.state[k].shape == b.state[k].shape, k
        assert torch.equal(a.state[k], b.state[k]), k
    for k in a.masks:
        assert b.masks[k].dtype == torch.bool and torch.equal(a.masks[k].bool(), b.masks[k]), k
    assert a.meta == b.meta


# ---------------------------------------------------------------- sparse: round trip and size

@pytest.mark.parametrize("arch", list(ZOO))
def test_sparse_round_trips_exactly_for_every_zoo_model_at_90_percent(arch):
    ckpt = pruned_checkpoint(arch)
    data = to_sparse_bytes(ckpt)
    back = from_sparse_bytes(data)
    assert_same(ckpt, back)
    assert back.meta["parents"] == [{"id": "dense-id", "kind": "pruned_from"}]       # lineage carried along
    assert len(data) < 0.2 * len(to_bytes(ckpt))


def test_sparse_is_at_most_15_percent_of_dense_at_90_percent_fp32():
    """LeNet-300-100 on 28x28 (266k weights): values + one bit per weight, against the dense file (fp32
    state + bool mask) and against the fp32 state alone (design 6c: about 0.13)."""
    ckpt = pruned_checkpoint("mlp")
    dense, sparse = len(to_bytes(ckpt)), len(to_sparse_bytes(ckpt))
    state_bytes = sum(t.numel() * t.element_size() for t in ckpt.state.values())
    assert sparse / dense <= 0.15 and sparse / state_bytes <= 0.15, (sparse, dense, state_bytes)
    n = sum(m.numel() for m in ckpt.masks.values())
    assert sparse < 0.1 * n * 4 + n / 8 + 20_000       # the formula, plus biases and the header
    layouts = sparse_sizes(ckpt)
    assert layouts["dense"] == 0 and layouts["bitmask"] >= 2 and sum(layouts.values()) == 3


def test_the_smallest_layout_is_chosen_by_the_formulas():
    # a 1000 x 100 fp32 matrix at 90 %: bitmask 12500 + 40000; CSR (uint8 columns) 1001 * 2 + 10000 * 5
    sizes = layout_bytes((1000, 100), torch.float32, 10_000)
    assert sizes == {"dense": 400_000, "bitmask": 12_500 + 40_000, "csr": 1001 * 2 + 50_000}
    assert choose_layout((1000, 100), torch.float32, 10_000) == "csr"
    assert choose_layout((100, 1000), torch.float32, 10_000) == "bitmask"      # uint16 columns: CSR is larger
    assert choose_layout((100, 1000), torch.float32, 98_000) == "dense"        # barely sparse: as it is
    for shape, nnz in [((1000, 100), 10_000), ((100, 1000), 10_000), ((100, 1000), 98_000), ((64, 3, 3, 3), 17)]:
        t = torch.zeros(math.prod(shape))
        t[torch.randperm(t.numel())[:nnz]] = torch.randn(nnz).abs() + 0.1
        t = t.reshape(shape)
        ckpt = Checkpoint(state={"w": t}, masks={"w": t != 0})
        back = from_sparse_bytes(to_sparse_bytes(ckpt))
        assert torch.equal(back.state["w"], t) and torch.equal(back.masks["w"], t != 0)
        layout = json.loads(_meta(to_sparse_bytes(ckpt))["tensors"])["w"]["layout"]
        assert layout == choose_layout(shape, torch.float32, nnz)


def test_sparse_keeps_dtypes_nan_a_mask_that_is_not_the_support_and_unmasked_tensors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) > 0.8)
    w[0, 0], w[1, 1] = float("nan"), -0.0
    mask = w != 0
    mask[2, 2] = True                         # a kept weight that happens to be 0.0
    w[2, 2] = 0.0
    state = {"w": w, "h": (torch.randn(32, 32, generator=g) * (torch.rand(32, 32, generator=g) > 0.5)).bfloat16(),
             "bias": torch.randn(64, generator=g), "bn.num_batches_tracked": torch.tensor(7)}
    masks = {"w": mask, "h": state["h"] != 0}
    back = from_sparse_bytes(to_sparse_bytes(Checkpoint(state=state, masks=masks, meta={"arch": "x"})))
    assert back.state["h"].dtype == torch.bfloat16 and torch.equal(back.state["h"], state["h"])
    assert torch.equal(back.state["bias"], state["bias"]) and back.state["bn.num_batches_tracked"].item() == 7
    assert torch.isnan(back.state["w"][0, 0]) and torch.equal(torch.nan_to_num(back.state["w"]), torch.nan_to_num(w))
    assert back.state["w"][1, 1].item() == 0.0           # -0.0 comes back as 0.0 (equal as a number)
    assert torch.equal(back.masks["w"], mask) and torch.equal(back.masks["h"], masks["h"])
    assert set(back.masks) == {"w", "h"}


def tiny_llm_checkpoint(sparsity: float = 0.5) -> Checkpoint:
    """A tiny random LLaMA with its blocks' linear weights magnitude-pruned to `sparsity` per tensor."""
    from tests.tiny_lm import tiny_llama
    from workers.lm.task import lm_masks
    model = tiny_llama()
    masks = lm_masks(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in masks:
            w = params[name]
            k = int(sparsity * w.numel())
            cut = w.abs().flatten().kthvalue(k).values
            masks[name] = w.abs() > cut
            w.mul_(masks[name])
    return Checkpoint(state={k: v.detach().clone() for k, v in model.state_dict().items()}, masks=masks,
                      meta={"arch": "hf:/tiny", "task": "causal_lm"})


def test_sparse_round_trips_a_tiny_llm():
    ckpt = tiny_llm_checkpoint()
    data = to_sparse_bytes(ckpt)
    assert_same(ckpt, from_sparse_bytes(data))
    assert len(data) < len(to_bytes(ckpt))


# ---------------------------------------------------------------- sparse: damaged files

def _meta(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])["__metadata__"]


def _rewrite(data: bytes, edit_entries=None, edit_tensors=None, digest: bool = True, **meta_over) -> bytes:
    """The file re-saved with its metadata or tensors changed (what a bad writer could produce: with the
    metadata's digest made to match, unless `digest` is false)."""
    from workers.export import _metadata_digest
    meta, tensors = _meta(data), st_load(data)
    entries = json.loads(meta["tensors"])
    if edit_entries:
        edit_entries(entries)
    if edit_tensors:
        edit_tensors(tensors)
    meta["tensors"] = json.dumps(entries)
    meta.update(meta_over)
    if digest:
        meta["metadata_digest"] = _metadata_digest(meta)
    return st_save(tensors, metadata=meta)


@pytest.fixture(scope="module")
def sparse_file():
    ckpt = pruned_checkpoint("lenet5")
    return ckpt, to_sparse_bytes(ckpt)


def test_a_flipped_byte_in_a_tensor_is_refused_naming_it(sparse_file):
    ckpt, data = sparse_file
    n = int.from_bytes(data[:8], "little")
    damaged = bytearray(data)
    damaged[len(data) - 3] ^= 0x10                       # in the last tensor's bytes
    with pytest.raises(SparseFormatError, match=r"x.sparse.safetensors.*tensor '[\w.]+'"):
        from_sparse_bytes(bytes(damaged), source="x.sparse.safetensors")
    for at in range(8 + n, len(data), 997):              # every flip anywhere in the data is caught
        damaged = bytearray(data)
        damaged[at] ^= 0x01
        with pytest.raises(SparseFormatError):
            from_sparse_bytes(bytes(damaged))


@pytest.mark.parametrize("cut", [0, 5, 100, -1, -1000])
def test_a_truncated_file_is_refused(sparse_file, cut):
    _, data = sparse_file
    with pytest.raises(SparseFormatError, match="truncated|not a readable safetensors"):
        from_sparse_bytes(data[:cut], source="m.sparse.safetensors")


def test_a_header_that_is_not_json_is_refused(sparse_file):
    _, data = sparse_file
    damaged = bytearray(data)
    damaged[9] = ord("#")
    with pytest.raises(SparseFormatError, match="header is not JSON|not a readable safetensors"):
        from_sparse_bytes(bytes(damaged))


def _set(key, value, name="10.weight"):
    def edit(entries):
        entries[name][key] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("shape", [120, 99]), "part 'bitmask/10.weight' has shape .* not .* as the metadata implies"),
    (_set("shape", "big"), "tensor '10.weight' has a bad shape"),
    (_set("layout", "coo"), "tensor '10.weight' has an unknown layout 'coo' .known: dense, bitmask, csr"),
    (_set("nnz", 5), "part 'values/10.weight' has shape"),
    (_set("nnz", -1), "tensor '10.weight' has a bad nonzero count"),
    (_set("dtype", "float64"), "part 'values/10.weight' is torch.float32, not torch.float64"),
    (_set("dtype", "floaty"), "tensor '10.weight' has an unknown dtype 'floaty'"),
    (_set("mask", "maybe"), "tensor '10.weight' has an unknown mask kind"),
    (_set("digest", "0" * 16), "tensor '10.weight' does not match the digest"),
])
def test_inconsistent_metadata_is_refused_naming_the_tensor(sparse_file, edit, message):
    _, data = sparse_file
    assert json.loads(_meta(data)["tensors"])["10.weight"]["layout"] == "bitmask"
    with pytest.raises(SparseFormatError, match=message):
        from_sparse_bytes(_rewrite(data, edit))


def test_edited_metadata_is_refused(sparse_file):
    """The model's metadata (lineage, arch) is covered by the header's digest, like the tensors' entries."""
    _, data = sparse_file
    meta = _meta(data)
    with pytest.raises(SparseFormatError, match="is damaged: its metadata .* does not match the digest"):
        from_sparse_bytes(_rewrite(data, digest=False, ladle=meta["ladle"].replace("dense-id", "other-id")))
    with pytest.raises(SparseFormatError, match="is damaged: its metadata .* does not match the digest"):
        from_sparse_bytes(_rewrite(data, _set("shape", [84, 120]), digest=False))


def test_missing_or_stray_parts_and_other_files_are_refused(sparse_file):
    ckpt, data = sparse_file
    with pytest.raises(SparseFormatError, match="tensor '10.weight' lacks its part 'values/10.weight'"):
        from_sparse_bytes(_rewrite(data, edit_tensors=lambda t: t.pop("values/10.weight")))
    with pytest.raises(SparseFormatError, match="tensors extra/x are not described by its metadata"):
        from_sparse_bytes(_rewrite(data, edit_tensors=lambda t: t.update({"extra/x": torch.zeros(1)})))
    with pytest.raises(SparseFormatError, match="part 'bitmask/10.weight' has shape .*not"):
        short = {"bitmask/10.weight": torch.zeros(3, dtype=torch.uint8)}
        from_sparse_bytes(_rewrite(data, edit_tensors=lambda t: t.update(short)))
    with pytest.raises(SparseFormatError, match="lacks or garbles 'tensors' or 'ladle'"):
        from_sparse_bytes(_rewrite(data, ladle="{not json"))
    with pytest.raises(SparseFormatError, match="not a Ladle sparse export .format 'ladle-checkpoint-1'"):
        from_sparse_bytes(to_bytes(ckpt))                 # the dense checkpoint is not a sparse file


def test_bad_csr_offsets_and_indices_are_refused():
    t = torch.zeros(1000, 100)
    t[torch.arange(1000), torch.arange(1000) % 100] = 1.0
    data = to_sparse_bytes(Checkpoint(state={"w": t}, masks={"w": t != 0}))
    assert json.loads(_meta(data)["tensors"])["w"]["layout"] == "csr"

    def offsets(tensors):
        p = tensors["indptr/w"].to(torch.int64)
        p[5] = p[4] - 1
        tensors["indptr/w"] = p
    with pytest.raises(SparseFormatError, match="tensor 'w': its CSR row offsets are not a nondecreasing run"):
        from_sparse_bytes(_rewrite(data, edit_tensors=offsets))

    def columns(tensors):
        tensors["indices/w"] = torch.from_numpy(np.full(1000, 200, dtype=np.uint8))
    with pytest.raises(SparseFormatError, match="tensor 'w': a CSR column index lies outside 0..99"):
        from_sparse_bytes(_rewrite(data, edit_tensors=columns))


# ---------------------------------------------------------------- hf

def test_hf_export_loads_with_from_pretrained_and_gives_the_stored_models_logits(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM
    arch, _ = tiny_lm
    base = tiny_llm_checkpoint()         # the pruned weights of a random LLaMA of the same shape
    from workers.lm.model import load_causal_lm
    model, _ = load_causal_lm(arch)
    model.load_state_dict(base.state)
    meta = {"arch": arch, "model_kwargs": {}, "task": "causal_lm", "model_id": "m1", "kind": "soup", "phase": 1,
            "name": "phase1/soup", "job": "lm", "parents": [{"id": "i0", "kind": "averaged_from"}],
            "spec": {"prune": {"target_sparsity": 0.5, "criterion": "wanda"}, "retrain": {"params": "mask_lora"}}}
    ckpt = from_bytes(to_bytes(Checkpoint(state=model.state_dict(), masks=base.masks, meta=meta)))
    folder = save_hf(ckpt, tmp_path / "hf")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    recipe = loaded.config.ladle_sparsity
    assert recipe["model_id"] == "m1" and recipe["parent"] == "i0" and recipe["prune"]["criterion"] == "wanda"
    assert recipe["sparsity"] == pytest.approx(0.5, abs=0.01) and recipe == json.loads(json.dumps(hf_recipe(ckpt)))
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    data = hf_zip(ckpt)
    assert data == hf_zip(ckpt) and data[:2] == b"PK"                          # the same bytes each time
    assert zip_folder(folder)[:2] == b"PK"


def test_hf_is_refused_for_an_image_model():
    with pytest.raises(ExportError, match="hf format is for causal language models.*'lenet5'"):
        save_hf(pruned_checkpoint("lenet5"), "/nonexistent")


# ---------------------------------------------------------------- onnx

@pytest.mark.parametrize("arch", ["lenet5", "resnet20", "mlp"])
def test_onnx_export_runs_under_onnxruntime_with_the_same_outputs_and_keeps_the_zeros(arch):
    ort = pytest.importorskip("onnxruntime")
    ckpt = pruned_checkpoint(arch)
    data = onnx_bytes(ckpt)
    inits = onnx_initializers(data)
    for name, mask in ckpt.masks.items():                    # every pruned weight is exactly 0 in the graph
        w = inits[name]
        assert np.all(w[~mask.numpy()] == 0) and np.array_equal(w, ckpt.state[name].numpy()), name
    model = build_model(arch, num_classes=10, in_shape=tuple(ckpt.meta["in_shape"]))
    model.load_state_dict(ckpt.state)
    model.eval()
    x = torch.randn(5, *ckpt.meta["in_shape"])             # a batch size other than the export's
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    [out] = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_zero_check_and_refusals():
    ckpt = pruned_checkpoint("lenet5")
    data = onnx_bytes(ckpt)
    name = next(iter(ckpt.masks))
    holes = {name: ckpt.masks[name].clone()}
    holes[name].view(-1)[ckpt.masks[name].view(-1).nonzero()[0]] = False      # a kept (nonzero) weight masked
    with pytest.raises(ExportError, match=f"weight '{name}' lost zeros of its mask"):
        check_onnx_zeros(data, holes)
    with pytest.raises(ExportError, match="'nope' is not an initializer"):
        check_onnx_zeros(data, {"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ExportError, match="onnx format is for image models.*causal language model"):
        onnx_bytes(Checkpoint(state={}, meta={"arch": "hf:/x", "task": "causal_lm"}))


def test_a_tied_head_is_stored_once_and_loads_back_as_two_equal_tensors():
    emb = torch.randn(300, 32)
    state = {"model.embed_tokens.weight": emb.clone(), "lm_head.weight": emb.clone(), "w": torch.randn(8, 8),
             "b": torch.zeros(8), "c": torch.zeros(8)}
    state["w"][state["w"].abs() < 1] = 0
    ckpt = Checkpoint(state=state, masks={"w": state["w"] != 0})
    data = to_sparse_bytes(ckpt)
    entries = json.loads(_meta(data)["tensors"])
    assert entries["model.embed_tokens.weight"] == {**entries["model.embed_tokens.weight"], "layout": "alias",
                                                    "of": "lm_head.weight"}
    assert entries["c"]["layout"] == "alias" and entries["c"]["of"] == "b"
    assert len(data) < 300 * 32 * 4 + 2000                      # the embedding's bytes once
    back = from_sparse_bytes(data)
    assert_same(ckpt, back)
    assert back.state["lm_head.weight"].data_ptr() != back.state["model.embed_tokens.weight"].data_ptr()

    def retarget(entries):
        entries["c"]["of"] = "nope"
    with pytest.raises(SparseFormatError, match="tensor 'c' is an alias of 'nope', which the file does not hold"):
        from_sparse_bytes(_rewrite(data, retarget))

    def reshape(entries):
        entries["c"]["shape"] = [4, 2]
    with pytest.raises(SparseFormatError, match=r"tensor 'c' is an alias of 'b', which is \(8,\) torch.float32, not"):
        from_sparse_bytes(_rewrite(data, reshape))


@pytest.mark.parametrize("arch", ["resnet20", "vgg16_bn"])
def test_channel_pruned_exports_are_smaller_and_compute_what_the_masked_model_computes(arch):
    """A channel-pruned ResNet-20 (residual adds) and VGG-16-BN, exported as onnx and compact: smaller shapes,
    the parameter count the removed channels imply, the masked model's outputs (under onnxruntime too)."""
    import onnxruntime as ort

    from workers.export import compact_bytes, load_compact
    from workers.structured import prune_channels, structure_report
    torch.manual_seed(0)
    in_shape = (3, 32, 32)
    model = build_model(arch, num_classes=10, in_shape=in_shape, **KWARGS.get(arch, {})).eval()
    for m in model.modules():                       # BatchNorm with statistics of its own: removed channels'
        if isinstance(m, torch.nn.BatchNorm2d):     # betas and means must not leak into the outputs
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    x0 = torch.zeros(1, *in_shape)
    r = prune_channels(model, None, 0.5, example_input=x0, scope="global")
    report = structure_report(r.model, r.masks, x0)
    meta = {"arch": arch, "model_kwargs": KWARGS.get(arch, {}), "num_classes": 10, "in_shape": list(in_shape),
            "spec": {"prune": {"structure": "channels", "target_sparsity": 0.5}}}
    ckpt = from_bytes(to_bytes(Checkpoint(state=r.model.state_dict(), masks=r.masks, meta=meta)))
    x = torch.randn(4, *in_shape)
    with torch.no_grad():
        want = r.model.eval()(x)
    small = load_compact(compact_bytes(ckpt))
    assert sum(p.numel() for p in small.parameters()) == report["parameters"] < report["dense_parameters"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, atol=1e-4, rtol=1e-4)
    data = onnx_bytes(ckpt)
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    inits = onnx_initializers(data)
    assert sum(inits[n].size for n in r.masks) == sum(int(p.numel()) for n, p in small.named_parameters()
                                                      if n in r.masks)
