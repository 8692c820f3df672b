import copy
import json
import logging
import warnings

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from tests.tiny_lm import VOCAB, tiny_llama, tiny_opt
from workers.lm.prune import prunable_lm_names
from workers.lm.structured import (check_whole_lm_groups, group_sizes, kv_budget, lm_group_masks, lm_groups,
                                   lm_removed, lm_stats, prune_lm_structured, shrink_lm)
from workers.pruning import PruningError, apply_masks
from workers.soup import average


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)


def tiny(kind: str):
    """tiny_llama (GQA: 4 heads, 2 KV heads) or a Qwen2 (q/k/v biases), Mistral or Qwen3 (q/k norms) of its size."""
    if kind == "llama":
        return tiny_llama()
    if kind == "llama-tied":
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**(SMALL | {"tie_word_embeddings": True}))).eval()
    torch.manual_seed(0)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    return model_cls(config_cls(**SMALL, **extra)).eval()


def ids(n: int = 3, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


REMOVED = {"layers": [{"neurons": [0, 5, 17, 63], "kv_groups": [1]}, {"neurons": [2, 3, 40, 41], "kv_groups": [0]}]}


# ---------------------------------------------------------------- groups and masks

def test_groups_of_tiny_llama_cover_llm_prune_names():
    model = tiny_llama()
    groups = lm_groups(model)
    assert groups.names == tuple(prunable_lm_names(model))
    assert len(groups.layers) == 2
    layer = groups.layers[0]
    assert (layer.neurons, layer.kv_groups, layer.heads_per_group, layer.head_dim) == (64, 2, 2, 8)
    assert layer.weights["o"] == "model.layers.0.self_attn.o_proj.weight"
    assert group_sizes(layer, 32) == (3 * 32, 2 * 8 * 32 + 2 * 2 * 8 * 32)


def test_unsupported_architecture_is_refused_by_name():
    with pytest.raises(PruningError, match="'opt'"):
        lm_groups(tiny_opt())


def test_group_masks_round_trip_and_cover_whole_groups():
    model = tiny_llama()
    groups = lm_groups(model)
    masks = lm_group_masks(model, REMOVED)
    assert set(masks) == set(groups.names)
    assert lm_removed(masks, groups) == REMOVED
    check_whole_lm_groups(masks, groups)
    size_n, size_g = group_sizes(groups.layers[0], 32)
    assert sum(int((~m).sum()) for m in masks.values()) == 2 * (4 * size_n + size_g)
    # KV group 1 of layer 0: k/v rows 8..15, q rows (heads 2, 3) 16..31 and those o_proj columns
    assert not masks["model.layers.0.self_attn.k_proj.weight"][8:16].any()
    assert masks["model.layers.0.self_attn.k_proj.weight"][:8].all()
    assert not masks["model.layers.0.self_attn.q_proj.weight"][16:32].any()
    assert masks["model.layers.0.self_attn.q_proj.weight"][:16].all()
    assert not masks["model.layers.0.self_attn.o_proj.weight"][:, 16:32].any()
    assert not masks["model.layers.0.mlp.down_proj.weight"][:, 17].any()
    json.dumps(lm_removed(masks, groups))


@pytest.mark.parametrize("bad,match", [
    ({"layers": [{"neurons": [64], "kv_groups": []}] * 2}, r"\[0, 64\)"),
    ({"layers": [{"neurons": [1, 1], "kv_groups": []}] * 2}, "distinct"),
    ({"layers": [{"neurons": [], "kv_groups": [0, 1]}] * 2}, "keep at least one"),
    ({"layers": [{"neurons": [], "kv_groups": []}]}, "one entry per layer"),
])
def test_bad_removed_is_refused(bad, match):
    with pytest.raises(PruningError, match=match):
        lm_group_masks(tiny_llama(), bad)


def test_partly_zero_group_is_refused():
    model = tiny_llama()
    groups = lm_groups(model)
    masks = lm_group_masks(model, REMOVED)
    masks["model.layers.1.mlp.up_proj.weight"][7, 3] = False        # one entry of neuron 7
    with pytest.raises(PruningError, match=r"layer 1: MLP neurons \[7\] are only partly pruned"):
        check_whole_lm_groups(masks, groups)
    masks = lm_group_masks(model, REMOVED)
    masks["model.layers.0.self_attn.o_proj.weight"][0, 0] = False   # one entry of KV group 0
    with pytest.raises(PruningError, match=r"layer 0: KV groups \[0\]"):
        prune_lm_structured(model, masks, 0.5)


# ---------------------------------------------------------------- masked == shrunk, export

def _expected_parameters(model, removed) -> int:
    groups = lm_groups(model)
    total = sum(p.numel() for p in model.parameters())
    for layer, entry in zip(groups.layers, removed["layers"]):
        size_n, size_g = group_sizes(layer, groups.hidden_size)
        bias_g = sum({"q": layer.heads_per_group, "k": 1, "v": 1}.get(r, 0) * layer.head_dim for r in layer.biases)
        total -= len(entry["neurons"]) * size_n + len(entry["kv_groups"]) * (size_g + bias_g)
    return total


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "mistral", "qwen3"])
def test_shrunk_model_equals_masked_model_and_reloads(kind, tmp_path):
    model = tiny(kind)
    x = ids()
    apply_masks(model, lm_group_masks(model, REMOVED))
    small = shrink_lm(model, REMOVED)
    assert type(small) is type(model)
    c = small.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size) == \
           (60, 2, 1, 8, 32)
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    torch.testing.assert_close(logits(small, x), logits(model, x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) == _expected_parameters(model, REMOVED)

    small.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 8
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert not [m for m in messages if any(s in m.lower() for s in ("mismatch", "newly initialized", "not used",
                                                                      "missing", "unexpected", "load report"))], messages
    torch.testing.assert_close(logits(loaded.eval(), x), logits(model, x), atol=1e-4, rtol=1e-4)


def test_shrink_refuses_layers_removing_different_counts():
    removed = {"layers": [{"neurons": [0], "kv_groups": [1]}, {"neurons": [0, 1], "kv_groups": [0]}]}
    with pytest.raises(PruningError, match="same numbers"):
        shrink_lm(tiny_llama(), removed)


def test_stats_count_what_the_removed_groups_predict():
    model = tiny_llama()
    small = shrink_lm(model, REMOVED)
    big, little = lm_stats(model, 16), lm_stats(small, 16)
    removed_entries = sum(4 * 96 + 1 * (2 * 8 * 32 + 2 * 2 * 8 * 32) for _ in range(2))
    assert big["parameters"] - little["parameters"] == removed_entries
    assert big["linear_macs_per_token"] - little["linear_macs_per_token"] == removed_entries
    assert big["attention_macs_per_token"] == 2 * 2 * 4 * 8 * 17 / 2
    assert little["attention_macs_per_token"] == big["attention_macs_per_token"] / 2
    assert big["macs_per_token"] == big["linear_macs_per_token"] + big["attention_macs_per_token"]


# ---------------------------------------------------------------- pruning

def test_magnitude_removes_the_weakest_groups_and_keeps_the_budget():
    model = tiny_llama()
    with torch.no_grad():
        layer = model.model.layers[0]
        for p in (layer.mlp.gate_proj.weight[9], layer.mlp.up_proj.weight[9], layer.mlp.down_proj.weight[:, 9]):
            p.mul_(1e-3)
        layer.self_attn.k_proj.weight[8:16].mul_(1e-3)
        layer.self_attn.v_proj.weight[8:16].mul_(1e-3)
        layer.self_attn.q_proj.weight[16:32].mul_(1e-3)
        layer.self_attn.o_proj.weight[:, 16:32].mul_(1e-3)
    result = prune_lm_structured(model, None, 0.5)
    groups = lm_groups(model)
    removed = lm_removed(result.masks, groups)
    assert [len(e["neurons"]) for e in removed["layers"]] == [32, 32]
    assert [len(e["kv_groups"]) for e in removed["layers"]] == [1, 1]
    assert 9 in removed["layers"][0]["neurons"] and removed["layers"][0]["kv_groups"] == [1]
    assert result.model is model and result.removed == sum(int((~m).sum()) for m in result.masks.values())
    assert 0 < result.norm_drop < 1
    state = model.state_dict()
    for n, m in result.masks.items():
        assert (state[n][~m] == 0).all()
    check_whole_lm_groups(result.masks, groups)


def test_cumulative_target_keeps_removed_groups_and_notes_the_head_rounding():
    model = tiny_llama()
    first = prune_lm_structured(model, None, 0.25)
    groups = lm_groups(model)
    r1 = lm_removed(first.masks, groups)
    assert [(len(e["neurons"]), len(e["kv_groups"])) for e in r1["layers"]] == [(16, 0), (16, 0)]
    assert any("floor(0.25 * 2) = 0" in n for n in first.notes)
    assert any("lm_head" in n and "hidden_size (32)" in n for n in first.notes)
    # retraining moves the weights; the next phase sees new magnitudes but the removed groups stay removed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    apply_masks(model, first.masks)
    second = prune_lm_structured(model, first.masks, 0.5)
    r2 = lm_removed(second.masks, groups)
    for a, b in zip(r1["layers"], r2["layers"]):
        assert set(a["neurons"]) <= set(b["neurons"]) and len(b["neurons"]) == 32 and len(b["kv_groups"]) == 1
    assert second.removed == sum(int((~m).sum()) for m in second.masks.values()) - \
        sum(int((~m).sum()) for m in first.masks.values())
    # a lower target later removes nothing new and revives nothing
    third = prune_lm_structured(model, second.masks, 0.1)
    assert lm_removed(third.masks, groups) == r2 and third.removed == 0


def test_wanda_uses_calibration_inputs():
    model = tiny_llama()
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.post_attention_layernorm.weight[5] = 0.0           # MLP input channel 5 is always 0
        for w in (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight):
            w[3].zero_()
            w[3, 5] = 10.0                                        # neuron 3: large, but reads only channel 5
    mag = lm_removed(prune_lm_structured(copy.deepcopy(model), None, 0.25).masks, lm_groups(model))
    result = prune_lm_structured(model, None, 0.25, criterion="wanda", calibration=ids(4, 16))
    wanda = lm_removed(result.masks, lm_groups(model))
    assert 3 not in mag["layers"][0]["neurons"]
    assert 3 in wanda["layers"][0]["neurons"]
    assert [len(e["neurons"]) for e in wanda["layers"]] == [16, 16]
    with pytest.raises(PruningError, match="calibration"):
        prune_lm_structured(model, None, 0.25, criterion="wanda")


def test_kv_budget_lowers_a_head_count_the_config_refuses():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=6,
                                         num_key_value_heads=6, intermediate_size=16, vocab_size=VOCAB))
    groups = lm_groups(model)
    assert kv_budget(model.config, groups, 0.2) == 0       # 5 heads: 24 % 5 != 0, refused by LlamaConfig
    assert kv_budget(model.config, groups, 0.4) == 2       # 4 heads
    assert kv_budget(model.config, groups, 0.99) == 5      # 1 head: at least one KV group stays
    result = prune_lm_structured(model, None, 0.2)
    assert any("asks for 1" in n for n in result.notes)


def test_averaging_states_sharing_the_structured_mask_keeps_removed_groups_zero():
    model = tiny_llama()
    masks = prune_lm_structured(model, None, 0.5).masks
    states = []
    for seed in (1, 2):
        m = copy.deepcopy(model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        apply_masks(m, masks)                          # what retraining does after every step
        states.append(m.state_dict())
    soup = average(states)
    for n, mask in masks.items():
        assert (soup[n][~mask] == 0).all()
    model.load_state_dict(soup)
    groups = lm_groups(model)
    check_whole_lm_groups(masks, groups)
    small = shrink_lm(model, lm_removed(masks, groups))
    x = ids()
    torch.testing.assert_close(logits(small, x), logits(model, x), atol=1e-4, rtol=1e-4)


def test_heads_false_removes_mlp_neurons_only_and_keeps_earlier_kv_groups():
    """prune.structure neurons: heads=False leaves attention whole (and a KV group an earlier phase removed
    stays removed), so the exported config keeps its head counts."""
    model = tiny_llama()
    r = prune_lm_structured(model, None, 0.5, heads=False)
    removed = lm_removed(r.masks, lm_groups(model))
    assert all(len(layer["kv_groups"]) == 0 and len(layer["neurons"]) == 32 for layer in removed["layers"])
    small = shrink_lm(model, removed)
    assert small.config.num_key_value_heads == 2 and small.config.intermediate_size == 32
    both = prune_lm_structured(tiny_llama(), None, 0.5)
    again = prune_lm_structured(both.model, both.masks, 0.75, heads=False)
    kept = lm_removed(again.masks, lm_groups(again.model))
    assert all(len(layer["kv_groups"]) == 1 and len(layer["neurons"]) == 48 for layer in kept["layers"])
