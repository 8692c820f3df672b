"""Text for causal language model jobs: files read as one string, cut into blocks of token ids, split into
train / validation / test blocks, a calibration sample, and a seeded batch loader.

Where the text comes from (`TextConfig.path`, see `text_files`): one file; a folder, meaning every *.txt under
it (recursively), sorted by path; or a glob pattern (``*``, ``?``, ``[``; ``**`` spans folders), its matches
sorted by path (a matched folder again stands for its *.txt files). Files are decoded as UTF-8 (undecodable
bytes become U+FFFD, a leading byte order mark is dropped) and joined with a blank line ("\\n\\n").

Blocks (`tokenize_blocks`): the text is tokenized once, without special tokens (no BOS / EOS added), the first
`max_tokens` ids are kept when a cap is given, and the ids are cut into n = floor(tokens / seq_len) consecutive
blocks of `seq_len`; the tail that does not fill a block is dropped.

Splits (`split_blocks`), for n blocks and a fraction f (val_fraction or test_fraction):

    k(f) = 0 if f == 0 else max(1, floor(f * n + 1/2)),    n_train = n - k(val_fraction) - k(test_fraction) >= 1,

the blocks of each split chosen by one seeded permutation of the n blocks (test first, then validation, the
rest for training), so the splits are disjoint and the same for the same seed. Calibration blocks
(`calibration_blocks`) are min(n, n_train) training blocks drawn without replacement by another seeded stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from workers.config import GLOB_CHARS, TEXT_SUFFIX, TextError, TextConfig, _txt_under, text_files  # noqa: F401  (torch-free: the driver and the API use them)

FIELD = "data"                      # the spec section these settings live in, as error messages name it
FILE_SEPARATOR = "\n\n"
MAX_TEXT_BYTES = 1 << 31            # a read cap over all files; more text than this should be cut up first
PREFIX_CHARS_PER_TOKEN = 8          # the first prefix tried when max_tokens is set: max_tokens * 8 characters
PREFIX_MARGIN_TOKENS = 16           # a prefix must give this many tokens beyond the cap (its cut end is dropped)
STREAM_SPLIT, STREAM_CALIBRATION = 1, 2


def _positive_int(value: object, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TextError(f"{FIELD}.{name} must be an integer >= {minimum}, got {value!r}")


def check_text(cfg: TextConfig) -> None:
    """Cheap validation for job specs, naming the bad field: a path that matches at least one file, seq_len >= 2
    (a block must predict a token), positive calibration_samples and batch_size, val_fraction and test_fraction
    each in [0, 0.5), max_tokens None or at least seq_len."""
    _positive_int(cfg.seq_len, "seq_len", 2)
    _positive_int(cfg.calibration_samples, "calibration_samples")
    _positive_int(cfg.batch_size, "batch_size")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 0.5:
            raise TextError(f"{FIELD}.{name} must be a number in [0, 0.5), got {value!r}")
    if cfg.max_tokens is not None:
        _positive_int(cfg.max_tokens, "max_tokens", cfg.seq_len if isinstance(cfg.seq_len, int) else 2)
    text_files(cfg.path)


# ---------------------------------------------------------------- files


def read_text_file(path: Path) -> str:
    """One file as text: UTF-8, undecodable bytes replaced by U+FFFD, a leading byte order mark dropped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TextError(f"{FIELD}.path: cannot read {str(path)!r} ({e})") from e
    return raw.decode("utf-8", errors="replace").removeprefix("\ufeff")


def load_text(cfg: TextConfig) -> str:
    """The text of every file `cfg.path` stands for (`text_files`), in order, joined with a blank line.
    Raises `TextError` when the files hold more than `MAX_TEXT_BYTES` or nothing but whitespace."""
    check_text(cfg)
    files = text_files(cfg.path)
    size = sum(f.stat().st_size for f in files)
    if size > MAX_TEXT_BYTES:
        raise TextError(f"{FIELD}.path {cfg.path!r}: {len(files)} file(s) hold {size} bytes, more than the "
                        f"{MAX_TEXT_BYTES} Ladle reads; point it at part of the corpus")
    text = FILE_SEPARATOR.join(read_text_file(f) for f in files)
    if not text.strip():
        raise TextError(f"{FIELD}.path {cfg.path!r}: {len(files)} file(s) ({', '.join(str(f) for f in files[:3])}"
                        f"{', ...' if len(files) > 3 else ''}) hold no text")
    return text


# ---------------------------------------------------------------- blocks

def _encode(text: str, tokenizer) -> list[int]:
    """Token ids of `text` with no special tokens added (and no warning about the model's maximum length)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _prefix(text: str, chars: int) -> str:
    """The first `chars` characters of `text`, cut back to the last whitespace when there is one."""
    if chars >= len(text):
        return text
    cut = max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars))
    return text[:cut] if cut > 0 else text[:chars]


def token_ids(text: str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """The token ids of `text` (no special tokens), at most the first `max_tokens`. With a cap, growing prefixes
    of the text (max_tokens * 8 characters, doubled until they give max_tokens + 16 tokens, cut at whitespace) are
    tokenized instead of the whole text; the ids kept lie well before a prefix's cut end."""
    if max_tokens is None:
        return _encode(text, tokenizer)
    chars = max_tokens * PREFIX_CHARS_PER_TOKEN
    while True:
        prefix = _prefix(text, chars)
        ids = _encode(prefix, tokenizer)
        if len(prefix) == len(text) or len(ids) >= max_tokens + PREFIX_MARGIN_TOKENS:
            return ids[:max_tokens]
        chars *= 2


def tokenize_blocks(text: str, tokenizer, seq_len: int, max_tokens: int | None = None, *,
                    min_blocks: int = 3) -> Tensor:
    """An (n, seq_len) int64 tensor of consecutive token ids: the text's ids (`token_ids`, at most `max_tokens`)
    cut into n = floor(tokens / seq_len) blocks, the tail that does not fill a block dropped.

    Raises `TextError` when fewer than `min_blocks` blocks come out (3 by default: one each for train,
    validation and test; `blocks_needed` gives the number a `TextConfig` needs)."""
    _positive_int(seq_len, "seq_len", 2)
    if max_tokens is not None:
        _positive_int(max_tokens, "max_tokens")
    ids = token_ids(text, tokenizer, max_tokens)
    n = len(ids) // seq_len
    if n < min_blocks:
        capped = f" (capped by max_tokens={max_tokens})" if max_tokens is not None else ""
        raise TextError(f"{FIELD}: the text gives {len(ids)} tokens{capped}, {n} block(s) of seq_len={seq_len}; at "
                        f"least {min_blocks} are needed ({min_blocks * seq_len} tokens): use more text, a smaller "
                        f"seq_len{' or a larger max_tokens' if capped else ''}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def blocks_needed(cfg: TextConfig) -> int:
    """The fewest blocks `split_blocks` can split: one for training plus one per nonzero held-out fraction."""
    return 1 + (cfg.val_fraction > 0) + (cfg.test_fraction > 0)


def load_blocks(cfg: TextConfig, tokenizer) -> Tensor:
    """`tokenize_blocks` of `load_text(cfg)` with cfg's seq_len and max_tokens, at least `blocks_needed(cfg)`."""
    return tokenize_blocks(load_text(cfg), tokenizer, cfg.seq_len, cfg.max_tokens, min_blocks=blocks_needed(cfg))


# ---------------------------------------------------------------- splits

@dataclass(frozen=True, eq=False)
class TextSplits:
    """Blocks (n_split, seq_len) per split, and the rows `*_index` of the full block tensor they came from:
    train in the seeded permutation's order, validation and test in text order."""

    train: Tensor
    val: Tensor
    test: Tensor
    train_index: Tensor
    val_index: Tensor
    test_index: Tensor


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent random stream per (seed, purpose)."""
    return np.random.default_rng([int(seed) % 2**63, stream])


def held_out(n: int, fraction: float) -> int:
    """k = 0 if fraction == 0 else max(1, floor(fraction * n + 1/2)): the blocks of n a held-out split gets."""
    return 0 if fraction <= 0 else max(1, math.floor(fraction * n + 0.5))


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for n blocks (`held_out` per split); raises `TextError` when no block is left
    for training."""
    n_val, n_test = held_out(n, val_fraction), held_out(n, test_fraction)
    if n - n_val - n_test < 1:
        raise TextError(f"{FIELD}: {n} block(s) cannot give {n_val} validation and {n_test} test block(s) and still "
                        f"train on one; use more text, a smaller seq_len or smaller fractions")
    return n - n_val - n_test, n_val, n_test


def split_blocks(blocks: Tensor, cfg: TextConfig, seed: int) -> TextSplits:
    """Train / validation / test blocks (`split_counts`) chosen by a permutation of the rows of `blocks` drawn with
    `seed`: its first n_test rows are the test split, the next n_val the validation split, the rest training.
    Disjoint, and the same for the same seed."""
    if not isinstance(blocks, Tensor) or blocks.dim() != 2:
        raise TextError(f"blocks must be an (n, seq_len) tensor, got {type(blocks).__name__}"
                        f"{tuple(blocks.shape) if isinstance(blocks, Tensor) else ''}")
    n_train, n_val, n_test = split_counts(len(blocks), cfg.val_fraction, cfg.test_fraction)
    order = torch.from_numpy(_rng(seed, STREAM_SPLIT).permutation(len(blocks)))
    test_index = order[:n_test].sort().values
    val_index = order[n_test:n_test + n_val].sort().values
    train_index = order[n_test + n_val:]
    return TextSplits(train=blocks[train_index], val=blocks[val_index], test=blocks[test_index],
                      train_index=train_index, val_index=val_index, test_index=test_index)


def load_text_splits(cfg: TextConfig, tokenizer, seed: int) -> TextSplits:
    """`split_blocks(load_blocks(cfg, tokenizer), cfg, seed)`."""
    return split_blocks(load_blocks(cfg, tokenizer), cfg, seed)


def calibration_blocks(splits: TextSplits, n: int, seed: int) -> Tensor:
    """min(n, n_train) training blocks, drawn without replacement with `seed` (a stream of its own, so the draw
    does not follow the split's permutation); the same for the same seed."""
    _positive_int(n, "calibration_samples")
    picked = torch.from_numpy(_rng(seed, STREAM_CALIBRATION).permutation(len(splits.train))[:n])
    return splits.train[picked]


# ---------------------------------------------------------------- loader

class BlockLoader:
    """Batches (b, seq_len) of token ids over `blocks`, on the CPU; re-iterable, `len` = batches.

    shuffle=True draws a new permutation on every pass from a generator seeded by `seed`, so two loaders with the
    same seed give the same batches pass after pass; shuffle=False keeps the rows' order. drop_last=True leaves
    out a last, smaller batch."""

    def __init__(self, blocks: Tensor, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False):
        _positive_int(batch_size, "batch_size")
        if not isinstance(blocks, Tensor) or blocks.dim() != 2:
            raise TextError(f"blocks must be an (n, seq_len) tensor, got {type(blocks).__name__}")
        self.blocks, self.batch_size, self.shuffle, self.drop_last = blocks, batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        n = len(self.blocks)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        order = torch.randperm(len(self.blocks), generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            start, stop = b * self.batch_size, (b + 1) * self.batch_size
            yield self.blocks[order[start:stop]] if order is not None else self.blocks[start:stop]


def block_loader(blocks: Tensor, batch_size: int, shuffle: bool, seed: int = 0, *,
                 drop_last: bool = False) -> BlockLoader:
    """A `BlockLoader` over `blocks` (see there)."""
    return BlockLoader(blocks, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
