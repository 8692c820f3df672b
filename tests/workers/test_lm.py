"""Causal LMs from local folders on real (tiny, randomly initialised) transformers models and a byte-level BPE
tokenizer trained here: save_pretrained folders (LLaMA, OPT), GGUF files written with the gguf package (float32
and Q8_0), the refusals, perplexity and the description. Nothing is downloaded."""

import json
import math

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from workers.lm.model import (
    HF_PREFIX,
    LMError,
    check_causal_lm,
    describe,
    is_causal_lm,
    load_causal_lm,
    perplexity,
    transformer_blocks,
)
from tests.tiny_lm import MODELS, VOCAB, make_tokenizer, save, tiny_llama, tiny_opt
from workers.models import ModelError

REPETITIVE = "the cat sat on the mat. " * 60


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 77, 200, 3, 299, 12, 0, 41], [1, 2, 3, 4, 5, 6, 7, 8]])


# ---------------------------------------------------------------- save_pretrained folders

@pytest.mark.parametrize("name", list(MODELS))
def test_a_saved_model_loads_with_its_tokenizer_and_gives_the_same_logits(tmp_path, tokenizer, name):
    model = MODELS[name]()
    loaded, tok = load_causal_lm(save(tmp_path / name, model, tokenizer))
    assert type(loaded) is type(model) and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    text = "the lazy dog ran over the mat"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.pad_token == tok.eos_token == "<eos>"                        # pad token added (eos)
    assert describe(loaded) == {
        "architecture": type(model).__name__, "model_type": name, "blocks": 2, "hidden_size": 32,
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": VOCAB, "dtype": "float32"}
    assert len(transformer_blocks(loaded)) == 2


def test_dtype_bfloat16_loads_bfloat16_weights(tmp_path, tokenizer):
    loaded, _ = load_causal_lm(save(tmp_path, tiny_llama(), tokenizer), dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and describe(loaded)["dtype"] == "bfloat16"


def test_is_causal_lm_tells_hf_specs_apart():
    assert is_causal_lm("hf:/models/x") and not is_causal_lm("resnet20") and not is_causal_lm(None)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("value", [True, False])
def test_trust_remote_code_is_refused_by_name_whatever_its_value(tmp_path, tokenizer, value):
    arch = save(tmp_path, tiny_llama(), tokenizer)
    with pytest.raises(LMError, match=r"model kwarg 'trust_remote_code' is not allowed.*never runs code"):
        load_causal_lm(arch, trust_remote_code=value)
    with pytest.raises(LMError, match="trust_remote_code"):                 # before the folder is even looked at
        check_causal_lm("hf:" + str(tmp_path / "missing"), trust_remote_code=value)


def test_a_folder_that_asks_for_remote_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "ladle_remote_test", "architectures": ["RemoteLM"],
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteLM"}}))
    (folder / "remote.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(LMError, match=r"the model needs code shipped with it .* Ladle never runs such code"):
        load_causal_lm(HF_PREFIX + str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"revision": "main"}, r"unknown model kwarg\(s\) 'revision' for a causal LM; allowed: gguf_file, dtype"),
    ({"device_map": "auto", "dtype": "float32"}, r"unknown model kwarg\(s\) 'device_map'"),
    ({"dtype": "float64"}, r"dtype must be one of float32, bfloat16, float16, got 'float64'"),
    ({"gguf_file": ""}, r"gguf_file must be the name of a file inside the model folder"),
    ({"gguf_file": "absent.gguf"}, r"gguf_file: 'absent.gguf' not found in .*; the folder holds no .gguf file"),
    ({"gguf_file": "../outside.gguf"}, r"gguf_file '../outside.gguf' points outside the model folder"),
    ({"gguf_file": "/abs/x.gguf"}, r"not an absolute path"),
    ({"gguf_file": "config.json"}, r"is not a GGUF file"),
])
def test_bad_model_kwargs_are_clear_errors(tmp_path, tokenizer, kwargs, message):
    arch = save(tmp_path / "m", tiny_llama(), tokenizer)
    (tmp_path / "outside.gguf").write_bytes(b"GGUF")
    with pytest.raises(LMError, match=message):
        load_causal_lm(arch, **kwargs)


def test_missing_or_wrong_folders_are_clear_model_errors(tmp_path):
    with pytest.raises(ModelError, match=r"folder .*nowhere.* does not exist \(Ladle never downloads models"):
        load_causal_lm(HF_PREFIX + str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LMError, match=r"is not a folder"):
        load_causal_lm(HF_PREFIX + str(tmp_path / "file"))
    with pytest.raises(LMError, match=r"has no config.json"):
        load_causal_lm(HF_PREFIX + str(tmp_path))
    with pytest.raises(LMError, match=r"no folder after 'hf:'"):
        load_causal_lm("hf:")
    with pytest.raises(LMError, match=r"not a causal language model"):
        load_causal_lm("resnet20")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(LMError, match=r"cannot load the model"):
        load_causal_lm(HF_PREFIX + str(tmp_path / "broken"))


# ---------------------------------------------------------------- GGUF

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary reordering of q / k rows (convert_hf_to_gguf.py), which transformers' reader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(path, model: LlamaForCausalLM, tokenizer, quant=gguf.GGMLQuantizationType.F32) -> None:
    """`model` as llama.cpp writes a LLaMA: its hyperparameters, a byte-level BPE ("gpt2") tokenizer, the tensors
    under GGUF names with q / k permuted, 2-D weights in `quant` (norms stay float32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("ladle-tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == gguf.GGMLQuantizationType.F32 else
                    gguf.LlamaFileType.MOSTLY_Q8_0)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    by_id = {i: t for t, i in {**spec["model"]["vocab"], **special}.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_eos_token_id(special["<eos>"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
                  for i in range(c.num_hidden_layers) for hf, g in GGUF_NAMES.items()})
    state = model.state_dict()
    assert set(state) == set(names)
    for hf_name, gguf_name in names.items():
        a = state[hf_name].detach().float().numpy()
        if ".attn_q." in gguf_name:
            a = _permute(a, c.num_attention_heads)
        elif ".attn_k." in gguf_name:
            a = _permute(a, c.num_key_value_heads)
        if a.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_float32_gguf_loads_with_its_own_tokenizer_and_gives_the_same_logits(tmp_path, tokenizer):
    model = tiny_llama()
    write_llama_gguf(tmp_path / "tiny-f32.gguf", model, tokenizer)           # the folder holds the GGUF file only
    loaded, tok = load_causal_lm(HF_PREFIX + str(tmp_path), gguf_file="tiny-f32.gguf")
    assert type(loaded) is LlamaForCausalLM and describe(loaded)["blocks"] == 2
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    text = "the lazy dog ran over the mat<eos>"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"] and tok.pad_token == "<eos>"
    with pytest.raises(LMError, match=r"'other.gguf' not found in .*; the folder holds tiny-f32.gguf"):
        load_causal_lm(HF_PREFIX + str(tmp_path), gguf_file="other.gguf")


def test_a_q8_0_gguf_is_dequantized_into_a_plain_model(tmp_path, tokenizer):
    model = tiny_llama()
    write_llama_gguf(tmp_path / "tiny-q8.gguf", model, tokenizer, quant=gguf.GGMLQuantizationType.Q8_0)
    tokenizer.save_pretrained(tmp_path)                                     # the folder's tokenizer is used
    loaded, tok = load_causal_lm(HF_PREFIX + str(tmp_path), gguf_file="tiny-q8.gguf")
    assert tok("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]
    linears = [m for m in loaded.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is nn.Linear for m in linears)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, p in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.float32 and got.shape == p.shape
        # Q8_0 keeps each row's blocks of 32 values (q / k rows are only reordered), so a weight comes back as
        # the gguf package's own round trip; norms were written in float32
        a = p.numpy()
        expected = gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8) if a.ndim == 2 else a
        assert torch.equal(got, torch.from_numpy(expected)), name
        if a.ndim == 2:
            assert 0 < (got - p).abs().max() <= p.abs().max() / 100, name    # really quantized, and close
    assert torch.allclose(logits(loaded, IDS), logits(model, IDS), atol=0.05)
    loaded.save_pretrained(tmp_path / "resaved")                            # a plain model saves like any other
    assert (tmp_path / "resaved" / "config.json").is_file()


# ---------------------------------------------------------------- perplexity and description

def test_uniform_logits_give_a_perplexity_of_the_vocabulary_size():
    model = tiny_llama()
    nn.init.zeros_(model.lm_head.weight)                                   # every logit 0: p = 1 / VOCAB
    model.train()
    blocks = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    out = perplexity(model, blocks, batch_size=2)
    assert out["tokens"] == 5 * 11 and out["blocks"] == 5 and out["tokens_per_second"] > 0
    assert out["loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert out["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert model.training                                                  # training mode restored


@pytest.mark.parametrize("name", list(MODELS))
def test_perplexity_is_the_models_own_next_token_loss(name):
    model = MODELS[name]()
    blocks = torch.randint(2, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = float(model(input_ids=blocks, labels=blocks).loss)    # transformers shifts the labels itself
    out = perplexity(model, blocks, batch_size=3)
    assert out["loss"] == pytest.approx(reference, rel=1e-5)
    assert perplexity(model, blocks, batch_size=2)["loss"] == pytest.approx(reference, rel=1e-5)


def test_training_on_repetitive_text_lowers_its_perplexity(tokenizer):
    ids = tokenizer(REPETITIVE, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[:len(ids) // 16 * 16]).view(-1, 16)
    model = tiny_llama()
    before = perplexity(model, blocks, batch_size=8)["perplexity"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(input_ids=blocks, labels=blocks).loss.backward()
        optimizer.step()
    after = perplexity(model, blocks, batch_size=8)["perplexity"]
    assert before > 100 and after < before / 10, (before, after)


def test_perplexity_refuses_blocks_it_cannot_score():
    model = tiny_llama()
    with pytest.raises(LMError, match=r"integer token ids"):
        perplexity(model, torch.zeros(2, 8), batch_size=1)
    with pytest.raises(LMError, match=r"integer token ids"):
        perplexity(model, torch.zeros(8, dtype=torch.long), batch_size=1)
    with pytest.raises(LMError, match=r"seq_len must be at least 2"):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long), batch_size=1)
    with pytest.raises(LMError, match=r"batch_size must be a positive integer"):
        perplexity(model, torch.zeros(2, 4, dtype=torch.long), batch_size=0)
    empty = perplexity(model, torch.zeros(0, 4, dtype=torch.long), batch_size=1)
    assert empty["tokens"] == 0 and math.isnan(empty["perplexity"])
