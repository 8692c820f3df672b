"""PERP retraining of tiny pruned causal LMs (Llama without biases, OPT with biases and a tied head)."""

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from workers.lm.perp import (ADAPTER_MODES, PERP_MODES, LowRankAdapter, PerpConfig, PerpError,  # noqa: E402
                          causal_lm_loss, evaluate_lm, linear_warmup_lrs, merge, prepare, pruned_nonzero,
                          retrain_lm, sparsity_after_merge)
from workers.train import TrainingDiverged  # noqa: E402

CPU = torch.device("cpu")
VOCAB, SEQ = 64, 16


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB))


def tiny_opt() -> nn.Module:
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0))


MODELS = {"llama": tiny_llama, "opt": tiny_opt}


@torch.no_grad()
def prune_blocks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Magnitude-prune half of every linear weight inside the decoder blocks (per layer, in place)."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            w = module.weight
            threshold = w.abs().flatten().kthvalue(w.numel() // 2).values
            masks[f"{name}.weight"] = w.abs() > threshold
            w.mul_(masks[f"{name}.weight"])
    return masks


def pruned(arch: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = MODELS[arch]()
    return model, prune_blocks(model)


# A learnable text: a fixed sequence of 12 distinct tokens, repeated (the next token is a function of
# the current one). Training and validation blocks come from disjoint stretches of it.
TEXT = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:12].repeat(400)


def blocks(start: int, n: int, seq: int = SEQ) -> torch.Tensor:
    return torch.stack([TEXT[start + i * seq:start + (i + 1) * seq] for i in range(n)])


def train_batches(n: int, batch: int = 8) -> list[torch.Tensor]:
    return [blocks(i * batch * SEQ, batch) for i in range(n)]


VAL = [blocks(4000, 8)]          # held out: positions 4000.. are never trained on here


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def expected_trained(arch: str, mode: str, keys: list[str], masks: dict) -> set[str]:
    """By name, independently of workers.lm.perp's rules: what each mode may change."""
    if mode == "all":
        return set(keys)
    if mode in ADAPTER_MODES:
        return set(masks)
    chosen = {k for k in keys if k.endswith(".bias") or "norm" in k}
    if mode == "bias_norm_head":
        chosen.add("lm_head.weight")
        if arch == "opt":            # the head is tied to the input embedding: one tensor, both names
            chosen.add("model.decoder.embed_tokens.weight")
    return chosen


def support_equals_mask(state: dict, masks: dict) -> bool:
    return all(torch.equal(state[n] != 0, m) for n, m in masks.items())


# ------------------------------------------------------------------------------ every mode, both LMs

@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("mode", PERP_MODES)
def test_only_the_modes_parameters_change_and_the_mask_holds(arch, mode):
    model, masks = pruned(arch)
    before = snapshot(model)
    cfg = PerpConfig(mode=mode, lr=1e-2, epochs=1, warmup_fraction=0.0)
    out = retrain_lm(model, train_batches(3, batch=4), cfg, masks, device=CPU)

    assert list(out.state) == list(before)                    # the original state-dict names, in order
    assert out.model is model
    assert not any(isinstance(m, LowRankAdapter) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())   # flags restored
    trained = expected_trained(arch, mode, list(before), masks)
    for key, old in before.items():
        if key in trained:
            # q.(k + b) shifts every attention score of a query alike: softmax ignores a key bias,
            # so its gradient is zero and it may stay put.
            if not key.endswith("k_proj.bias"):
                assert not torch.equal(out.state[key], old), f"{key} should have trained"
        else:
            assert torch.equal(out.state[key], old), f"{key} should be frozen"

    if mode == "lora":
        assert out.sparsity == pytest.approx(0.5)
        assert out.sparsity_lost > 0.1                        # B A filled pruned weights
        assert out.sparsity_lost == pytest.approx(0.5 - sparsity_after_merge(model, masks))
        assert pruned_nonzero(model, masks) > 0
    else:
        assert out.pruned_nonzero_before_remask == 0           # by construction, before the guard
        assert support_equals_mask(out.state, masks)           # zeros exactly where the mask is False
        assert out.sparsity_lost == pytest.approx(0.0)
    assert out.steps == 3 and out.tokens == 3 * 4 * SEQ and out.tokens_per_second > 0
    assert out.peak_memory_source == "process_max_rss" and out.peak_memory_bytes > 0


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_merge_keeps_the_function_and_masked_variants_keep_the_mask_by_construction(arch, mode):
    model, masks = pruned(arch)
    keys = list(model.state_dict())
    x = blocks(0, 2)
    prepared = prepare(model, masks, mode, rank=4, alpha=8, dropout=0.1)
    assert len(prepared.adapters) == len(masks) == (14 if arch == "llama" else 12)
    with torch.no_grad():
        for adapter in prepared.adapters.values():
            adapter.lora_B.normal_(0, 0.5)                     # a non-trivial update
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = merge(model, prepared, remask=False)(input_ids=x).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, LowRankAdapter) for m in model.modules())
    if mode == "lora":
        assert pruned_nonzero(model, masks) > 0
    else:                                                      # no re-masking happened
        assert pruned_nonzero(model, masks) == 0
        assert support_equals_mask(model.state_dict(), masks)
    with pytest.raises(PerpError, match="already merged"):
        merge(model, prepared)


def test_the_adapters_start_as_the_pruned_model():
    model, masks = pruned("opt")
    x = blocks(0, 2)
    with torch.no_grad():
        plain = model(input_ids=x).logits
        for mode in ADAPTER_MODES:
            prepared = prepare(model, masks, mode)
            torch.testing.assert_close(model(input_ids=x).logits, plain, rtol=0, atol=1e-6)
            merge(model, prepared)


# ------------------------------------------------------------------------------------- learning

@pytest.mark.parametrize("mode", ["mask_lora", "bias_norm_head"])
def test_retraining_lowers_validation_perplexity(mode):
    model, masks = pruned("llama")
    before = evaluate_lm(model, VAL, device=CPU)["perplexity"]
    rows = []
    cfg = PerpConfig(mode=mode, lr=1e-2, epochs=2, warmup_fraction=0.1)
    out = retrain_lm(model, train_batches(8), cfg, masks, device=CPU, val_blocks=VAL, on_epoch=rows.append)
    assert [r["epoch"] for r in rows] == [1, 2] and out.history == rows
    assert {"epoch", "step", "lr", "train_loss", "val_loss", "val_perplexity"} <= set(rows[0])
    assert rows[-1]["val_perplexity"] < 0.75 * before
    assert rows[-1]["val_perplexity"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    # the merged plain model is the model that was validated
    assert evaluate_lm(out.model, VAL, device=CPU)["perplexity"] == pytest.approx(rows[-1]["val_perplexity"],
                                                                                  rel=1e-4)


# ---------------------------------------------------------------------------- counts and shares

def test_trainable_counts_and_shares():
    counts = {}
    for mode in PERP_MODES:
        model, masks = pruned("llama")
        p = prepare(model, masks, mode)
        counts[mode] = (p.trainable_count, p.share, p.total_count)
    total = 2 * VOCAB * 32 + 2 * (32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3 + 2 * 32) + 32
    assert {c[2] for c in counts.values()} == {total} == {22688}
    # by hand: 2 layers x 2 RMSNorms x 32 + the final RMSNorm (Llama has no biases)
    assert counts["bias_norm"][0] == 2 * 2 * 32 + 32
    # r (in + out) per masked linear, r = 8: q, o 32->32; k, v 32->16; gate, up 32->64; down 64->32
    per_layer = 8 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    for mode in ADAPTER_MODES:
        assert counts[mode][0] == 2 * per_layer
    assert counts["bias_norm_head"][0] == counts["bias_norm"][0] + VOCAB * 32
    assert counts["bias_norm"][1] < counts["bias_norm_head"][1] < counts["lora"][1] < 1.0
    assert counts["all"][0] == total and counts["all"][1] == 1.0


def test_a_tied_head_is_trained_once_with_the_embedding():
    model, masks = pruned("opt")
    p = prepare(model, masks, "bias_norm_head")
    assert p.head_tied
    # the tied head/embedding 64 x 32, per layer 4 x 32 attention biases + 64 + 32 MLP biases + 2 LayerNorms
    # x (32 + 32), then the final LayerNorm
    assert p.trainable_count == VOCAB * 32 + 2 * (4 * 32 + 64 + 32 + 2 * 64) + 64
    assert model.lm_head.weight.requires_grad and model.model.decoder.embed_tokens.weight.requires_grad


# ------------------------------------------------------------------------- schedule and batching

def test_linear_schedule_with_warmup_values():
    assert linear_warmup_lrs(1.0, 10, 2) == pytest.approx([0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8,
                                                            2 / 8, 1 / 8])
    assert linear_warmup_lrs(0.3, 4, 0) == pytest.approx([0.3, 0.225, 0.15, 0.075])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=12)
    assert linear_warmup_lrs(1.0, 12, 3) == pytest.approx([hf.lr_lambdas[0](t) for t in range(12)])
    with pytest.raises(PerpError, match="warm-up"):
        linear_warmup_lrs(1.0, 4, 4)


def test_training_steps_follow_the_schedule_and_accumulation_groups():
    model, masks = pruned("llama")
    steps = []
    cfg = PerpConfig(mode="bias_norm", lr=1e-3, epochs=2, warmup_fraction=0.25, grad_accumulation=2)
    data = train_batches(5, batch=2)                  # 5 micro-batches, k = 2: steps of 2, 2, 1 per epoch
    out = retrain_lm(model, data, cfg, masks, device=CPU, on_step=steps.append)
    assert out.steps == 6 and [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [s["lr"] for s in steps] == pytest.approx(linear_warmup_lrs(1e-3, 6, 2))   # w = round(0.25 * 6)
    assert [s["tokens"] for s in steps] == [4 * SEQ, 4 * SEQ, 2 * SEQ] * 2
    assert [r["lr"] for r in out.history] == pytest.approx([steps[2]["lr"], steps[5]["lr"]])


def test_accumulating_unequal_micro_batches_equals_one_big_batch():
    big = blocks(0, 8)
    micro = list(torch.split(big, [3, 1, 2, 2]))
    # The micro-batches' losses differ, so an unweighted mean of their means is not the big batch's
    # loss: the test would catch accumulation that forgets the token weights (or sums instead of averaging).
    model, _ = pruned("llama")
    with torch.no_grad():
        losses = [float(causal_lm_loss(model(input_ids=x).logits, x)) for x in micro]
        whole = float(causal_lm_loss(model(input_ids=big).logits, big))
    assert abs(sum(losses) / 4 - whole) > 1e-3

    results = {}
    for k, data in ((1, [big]), (4, micro)):
        model, masks = pruned("llama")
        rows = []
        cfg = PerpConfig(mode="all", lr=1e-3, warmup_fraction=0.0, grad_accumulation=k, max_grad_norm=None)
        out = retrain_lm(model, data, cfg, masks, device=CPU, on_step=rows.append)
        assert out.steps == 1
        results[k] = (rows[0], out.state)
    (row1, state1), (row4, state4) = results[1], results[4]
    assert row4["loss"] == pytest.approx(whole, rel=1e-5) and row1["loss"] == pytest.approx(whole, rel=1e-5)
    assert row4["grad_norm"] == pytest.approx(row1["grad_norm"], rel=1e-4)
    for key in state1:
        torch.testing.assert_close(state4[key], state1[key], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_update():
    states, norms = {}, {}
    for ckpt in (False, True):
        model, masks = pruned("llama")
        seen = []

        def on_step(row, model=model, seen=seen):
            seen.append((row["grad_norm"], model.is_activation_checkpointing))

        cfg = PerpConfig(mode="mask_lora", lr=1e-2, warmup_fraction=0.0, gradient_checkpointing=ckpt)
        out = retrain_lm(model, train_batches(2, batch=4), cfg, masks, device=CPU, on_step=on_step)
        assert [on for _, on in seen] == [ckpt, ckpt]                 # on while training ...
        assert not model.is_activation_checkpointing                 # ... and off afterwards
        states[ckpt], norms[ckpt] = out.state, [n for n, _ in seen]
    assert norms[True] == pytest.approx(norms[False], rel=1e-5)
    for key in states[False]:
        torch.testing.assert_close(states[True][key], states[False][key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- errors

def test_a_nan_loss_raises_and_gives_the_model_its_modules_back():
    model, masks = pruned("llama")
    keys = list(model.state_dict())
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="learning rate"):
        retrain_lm(model, train_batches(2, batch=2), PerpConfig(mode="mask_lora"), masks, device=CPU)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, LowRankAdapter) for m in model.modules())


def test_clear_errors():
    with pytest.raises(PerpError, match="known: bias_norm"):
        PerpConfig(mode="dense")
    model, masks = pruned("llama")
    with pytest.raises(PerpError, match="CUDA"):
        retrain_lm(model, train_batches(1), PerpConfig(autocast="bf16"), masks, device=CPU)
    model, masks = pruned("llama")
    with pytest.raises(PerpError, match="not the weight of an nn.Linear"):
        prepare(model, {"model.embed_tokens.weight": torch.ones(VOCAB, 32, dtype=torch.bool)}, "lora")
    with pytest.raises(PerpError, match="needs masks"):
        prepare(model, {}, "mask_lora")
    name = next(iter(masks))
    with torch.no_grad():
        model.get_parameter(name)[~masks[name]] = 1.0
    with pytest.raises(PerpError, match="not pruned to its masks"):
        prepare(model, masks, "bias_norm")
    with pytest.raises(PerpError, match="sized"):
        retrain_lm(model, iter(train_batches(1)), PerpConfig(), masks, device=CPU)


# -------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda_keeps_the_mask():
    model, masks = pruned("llama")
    cfg = PerpConfig(mode="mask_lora", lr=1e-2, epochs=2, autocast="auto")
    out = retrain_lm(model, train_batches(4), cfg, masks, device=torch.device("cuda"), val_blocks=VAL)
    assert all(math.isfinite(r["train_loss"]) for r in out.history)
    assert out.pruned_nonzero_before_remask == 0 and support_equals_mask(out.state, masks)
    assert out.peak_memory_source == "cuda_max_memory_allocated" and out.peak_memory_bytes > 0
