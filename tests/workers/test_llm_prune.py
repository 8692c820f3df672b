import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from workers.lm.prune import (find_blocks, layer_mask, nm_mask, parse_pattern, prunable_lm_names, prune_causal_lm,
                               row_mask, sparsegpt_prune, wanda_scores)
from workers.pruning import PruningError


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "opt": tiny_opt}


def calibration(n: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 100, (n, seq_len), generator=torch.Generator().manual_seed(1))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- patterns and masks

@pytest.mark.parametrize("text,expected", [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)), (" 1:4 ", (1, 4))])
def test_parse_pattern_accepts(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["4:4", "0:4", "5:4", "2-4", "dense", "", "2:4:8"])
def test_parse_pattern_refuses_naming_the_value(text):
    with pytest.raises(PruningError, match=repr(text)):
        parse_pattern(text)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_per_group_of_m_inputs(n, m):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(8, 16, generator=g)
    keep = nm_mask(scores, None, n, m)
    groups = keep.view(8, 16 // m, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the highest-scored of their group
    s = scores.view(8, 16 // m, m)
    kept_min = torch.where(groups, s, torch.inf).amin(-1)
    pruned_max = torch.where(~groups, s, -torch.inf).amax(-1)
    assert (kept_min > pruned_max).all()
    # with weights already dead: at most n alive per group, the dead stay dead
    alive = torch.rand(8, 16, generator=g) > 0.6
    keep = nm_mask(scores, alive, n, m)
    assert (keep.view(8, -1, m).sum(-1) <= n).all()
    assert not (keep & ~alive).any()
    assert (keep.view(8, -1, m).sum(-1) == alive.view(8, -1, m).sum(-1).clamp(max=n)).all()


def test_nm_mask_refuses_inputs_not_divisible_by_m():
    with pytest.raises(PruningError, match="divisible"):
        nm_mask(torch.rand(4, 10), None, 2, 4)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_row_mask_prunes_the_target_share_of_every_row(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 40, generator=g)
    keep = row_mask(scores, None, sparsity)
    assert ((~keep).sum(1) == round(sparsity * 40)).all()
    assert (torch.where(keep, scores, torch.inf).amin(1) > torch.where(~keep, scores, -torch.inf).amax(1)).all()
    # earlier pruned weights count towards the target and stay pruned
    alive = row_mask(torch.rand(12, 40, generator=g), None, 0.2)
    keep = row_mask(scores, alive, sparsity)
    assert not (keep & ~alive).any()
    assert ((~keep).sum(1) == round(sparsity * 40)).all()


def test_layer_mask_prunes_the_lowest_over_the_whole_matrix():
    scores = torch.rand(6, 10, generator=torch.Generator().manual_seed(0))
    keep = layer_mask(scores, None, 0.4)
    assert int((~keep).sum()) == 24
    assert scores[keep].min() > scores[~keep].max()
    with pytest.raises(PruningError):
        layer_mask(scores, None, 1.0)


def test_wanda_scores_multiply_magnitude_by_input_norm():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    sq = torch.tensor([4.0, 9.0])
    torch.testing.assert_close(wanda_scores(w, sq), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))


# ---------------------------------------------------------------- SparseGPT on one layer

def correlated_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(64, 6, generator=g) @ torch.randn(6, 512, generator=g) + 0.1 * torch.randn(64, 512, generator=g)
    return w, x, 2.0 * x @ x.T / x.shape[1]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_sparsegpt_changes_the_output_less_than_magnitude(pattern, blocksize):
    w, x, h = correlated_layer()
    nm = parse_pattern(pattern)
    w_hat, keep = sparsegpt_prune(w, h, 0.5, nm, blocksize=blocksize)
    assert int((~keep).sum()) == w.numel() // 2
    assert torch.equal(w_hat != 0, keep)
    if nm:
        assert ((w_hat != 0).view(16, -1, 4).sum(-1) == 2).all()
    mag_keep = nm_mask(w.abs(), None, *nm) if nm else layer_mask(w.abs(), None, 0.5)
    err_sparsegpt = torch.linalg.norm((w - w_hat) @ x)
    err_magnitude = torch.linalg.norm((w - w * mag_keep) @ x)
    assert err_sparsegpt < 0.5 * err_magnitude


def test_sparsegpt_handles_dead_inputs_and_keeps_dead_weights_zero():
    w, x, _ = correlated_layer(1)
    x[5] = 0.0                                  # an input that never fires
    h = 2.0 * x @ x.T / x.shape[1]
    alive = torch.rand(16, 64, generator=torch.Generator().manual_seed(2)) > 0.2
    w_hat, keep = sparsegpt_prune(w * alive, h, 0.6, alive=alive, blocksize=32)
    assert torch.isfinite(w_hat).all()
    assert not (keep & ~alive).any()
    assert int((~keep).sum()) == round(0.6 * w.numel())
    assert not keep[:, 5].any()                 # weights on a dead input cost nothing: pruned first
    assert torch.equal(w_hat != 0, keep)


# ---------------------------------------------------------------- causal LMs

def test_wanda_on_llama_prunes_every_row_and_only_the_blocks_linears():
    model = tiny_llama()
    before = weights(model)
    names = prunable_lm_names(model)
    assert len(names) == 2 * 7 and all(".layers." in n for n in names)
    result = prune_causal_lm(model, calibration(), 0.5, criterion="wanda")
    assert set(result.masks) == set(names)
    after = weights(model)
    for n in names:
        m = result.masks[n]
        assert ((~m).sum(1) == round(0.5 * m.shape[1])).all(), n
        assert torch.equal(after[n] != 0, m), n
        torch.testing.assert_close(after[n][m], before[n][m], rtol=0, atol=0)
    for k in before:                            # embeddings, norms, lm_head untouched
        if k not in names:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    assert result.sparsity == pytest.approx(0.5)
    assert result.per_layer == {n: pytest.approx(0.5) for n in names}
    assert result.seconds > 0
    assert torch.isfinite(model(calibration()).logits).all()


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "magnitude"])
def test_two_four_sparsity_on_llama_and_opt(arch, criterion):
    model = MODELS[arch]()
    result = prune_causal_lm(model, calibration(), 0.5, criterion=criterion, pattern="2:4")
    state = model.state_dict()
    for n, m in result.masks.items():
        nonzero = (state[n] != 0).view(m.shape[0], -1, 4).sum(-1)
        assert (nonzero <= 2).all(), n
        assert (m.view(m.shape[0], -1, 4).sum(-1) == 2).all(), n
        assert torch.equal(state[n] != 0, m), n
    assert torch.isfinite(model(calibration()).logits).all()


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "magnitude"])
def test_iterative_pruning_keeps_earlier_pruned_weights_pruned(criterion):
    model = tiny_llama()
    first = prune_causal_lm(model, calibration(), 0.3, criterion=criterion)
    second = prune_causal_lm(model, calibration(), 0.5, criterion=criterion, masks=first.masks)
    state = model.state_dict()
    for n, m in second.masks.items():
        assert not (m & ~first.masks[n]).any(), n
        assert int((~m).sum()) == round(0.5 * m.numel()), n
        assert torch.equal(state[n] != 0, m), n
    assert second.sparsity == pytest.approx(0.5)
    assert torch.isfinite(model(calibration()).logits).all()


def block_inputs(model, cal, index: int) -> list[torch.Tensor]:
    """The hidden states the model's block `index` receives for each sample (batch of one)."""
    seen = []
    handle = find_blocks(model)[1][index].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        for sample in cal:
            model(sample[None], use_cache=False)
    handle.remove()
    return seen


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_calibration_passes_through_the_pruned_blocks(arch, criterion):
    model = MODELS[arch]()
    dense = copy.deepcopy(model)
    cal = calibration()
    seen = []
    handle = find_blocks(model)[1][1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    prune_causal_lm(model, cal, 0.5, criterion=criterion)
    handle.remove()
    assert len(seen) == 2 * len(cal)            # statistics pass, then the pass that feeds the next block
    calibrated_on = seen[:len(cal)]

    def gap(xs, ys):
        return max(float((a - b).abs().max()) for a, b in zip(xs, ys))

    to_pruned = gap(calibrated_on, block_inputs(model, cal, 1))     # block 0 as pruned
    to_dense = gap(calibrated_on, block_inputs(dense, cal, 1))      # block 0 before pruning
    assert to_pruned <= 1e-5
    assert to_dense > 1e-3 and to_dense > 100 * to_pruned


def test_prune_causal_lm_refuses_bad_input():
    model = tiny_llama()
    with pytest.raises(PruningError, match="criterion"):
        prune_causal_lm(model, calibration(), 0.5, criterion="obs")
    with pytest.raises(PruningError, match="2:4"):
        prune_causal_lm(model, calibration(), 0.3, criterion="wanda", pattern="2:4")
    with pytest.raises(PruningError, match="calibration"):
        prune_causal_lm(model, None, 0.5, criterion="sparsegpt")
    masks = {n: torch.ones(1, dtype=torch.bool) for n in prunable_lm_names(model)[1:]}
    with pytest.raises(PruningError, match="missing"):
        prune_causal_lm(model, calibration(), 0.5, criterion="wanda", masks=masks)
