"""Tiny causal language models made here (no downloads): a byte-level BPE tokenizer trained on a small
corpus, random LLaMA (no biases) and OPT (biases, tied head) models, and `pretrained_folder`, which
trains one briefly on the corpus and saves it with its tokenizer as an `hf:` folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from workers.lm.model import HF_PREFIX

CORPUS = ("the quick brown fox jumps over the lazy dog. " * 20 + "a cat sat on the mat and the dog ran away. " * 20
          + "Ladle prunes and retrains small models on the CPU. " * 10)
VOCAB = 300


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens trained on CORPUS (id 0 is <eos>), as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert tok.get_vocab_size() == VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=0, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                       vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return OPTForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "opt": tiny_opt}


def save(folder, model, tokenizer=None) -> str:
    """`save_pretrained` the model (and tokenizer) into `folder`; returns its `hf:` arch."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return HF_PREFIX + str(folder)


def pretrained_folder(folder: Path, kind: str = "llama", steps: int = 60, seq_len: int = 16) -> str:
    """A tiny `kind` model trained `steps` AdamW steps on CORPUS (so that pruning hurts it and retraining
    can recover), saved with its tokenizer; returns its `hf:` arch."""
    tokenizer = make_tokenizer()
    ids = tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[:len(ids) // seq_len * seq_len]).view(-1, seq_len)
    model = MODELS[kind]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = blocks[torch.randperm(len(blocks), generator=gen)[:16]]
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    return save(folder, model.eval(), tokenizer)
