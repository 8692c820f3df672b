"""Text for causal LM jobs on real files and a real (word-level, built offline) fast tokenizer: files, folders
and globs; blocks, splits, calibration and the loader."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workers.lm.text import (
    TextConfig,
    TextError,
    block_loader,
    blocks_needed,
    calibration_blocks,
    check_text,
    held_out,
    load_blocks,
    load_text,
    load_text_splits,
    split_blocks,
    split_counts,
    text_files,
    token_ids,
    tokenize_blocks,
)

WORDS = 500


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level: "w<i>" is id i + 1, anything else [UNK] (0); words split on whitespace."""
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def test_a_file_is_read_whole_as_utf8_with_bad_bytes_replaced(tmp_path):
    f = tmp_path / "a.md"                         # a single file needs no .txt suffix
    f.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9 \xff end\n")
    assert load_text(TextConfig(path=str(f))) == "café \ufffd end\n"


def test_a_folder_means_every_txt_under_it_recursively_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "b" / "deep" / "z.txt").write_text("three")
    (tmp_path / "b" / "a.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "notes.md").write_text("skipped")
    files = text_files(str(tmp_path))
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.txt", "b/a.txt", "b/deep/z.txt"]
    assert load_text(TextConfig(path=str(tmp_path))) == "one\n\ntwo\n\nthree"


def test_a_glob_matches_files_sorted_and_recursively_with_double_star(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "x2.txt").write_text("b")
    (tmp_path / "x1.txt").write_text("a")
    (tmp_path / "y.txt").write_text("not matched")
    (tmp_path / "sub" / "x3.txt").write_text("c")
    assert load_text(TextConfig(path=str(tmp_path / "x*.txt"))) == "a\n\nb"
    assert load_text(TextConfig(path=str(tmp_path / "**" / "x*.txt"))) == "c\n\na\n\nb"     # sub/ < x1.txt


def test_paths_that_match_nothing_or_hold_no_text_are_clear_errors(tmp_path):
    with pytest.raises(TextError, match=r"data.path .*nowhere.txt.* does not exist"):
        load_text(TextConfig(path=str(tmp_path / "nowhere.txt")))
    with pytest.raises(TextError, match=r"data.path .*\*.nomatch.* matches no file"):
        load_text(TextConfig(path=str(tmp_path / "*.nomatch")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.md").write_text("not text for Ladle")
    with pytest.raises(TextError, match=r"folder without \*.txt files"):
        load_text(TextConfig(path=str(tmp_path / "empty")))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n")
    with pytest.raises(TextError, match=r"blank.txt.*hold no text"):
        load_text(TextConfig(path=str(blank)))


@pytest.mark.parametrize("field,value,message", [
    ("seq_len", 1, r"data.seq_len must be an integer >= 2"),
    ("batch_size", 0, r"data.batch_size"),
    ("calibration_samples", True, r"data.calibration_samples"),
    ("val_fraction", 0.5, r"data.val_fraction must be a number in \[0, 0.5\)"),
    ("test_fraction", -0.1, r"data.test_fraction"),
    ("max_tokens", 10, r"data.max_tokens must be an integer >= 16"),
])
def test_bad_settings_name_their_field(tmp_path, field, value, message):
    f = tmp_path / "t.txt"
    f.write_text("w1 w2")
    with pytest.raises(TextError, match=message):
        check_text(TextConfig(path=str(f), **{"seq_len": 16, field: value}))


def test_blocks_are_consecutive_ids_and_the_tail_is_dropped(tokenizer):
    blocks = tokenize_blocks(words(0, 103), tokenizer, seq_len=10)
    assert blocks.shape == (10, 10) and blocks.dtype == torch.int64
    assert torch.equal(blocks.flatten(), torch.arange(1, 101))         # w0..w99; w100..w102 dropped


def test_max_tokens_keeps_the_first_tokens_and_matches_tokenizing_everything(tokenizer):
    text = words(0, WORDS)
    assert token_ids(text, tokenizer, 37) == token_ids(text, tokenizer)[:37] == list(range(1, 38))
    blocks = tokenize_blocks(text, tokenizer, seq_len=10, max_tokens=45)
    assert blocks.shape == (4, 10) and int(blocks.max()) == 40
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == WORDS  # no special tokens added


def test_too_little_text_for_a_block_per_split_is_a_clear_error(tokenizer):
    with pytest.raises(TextError, match=r"gives 25 tokens, 2 block\(s\) of seq_len=10; at least 3 are needed"):
        tokenize_blocks(words(0, 25), tokenizer, seq_len=10)
    with pytest.raises(TextError, match=r"capped by max_tokens=15.*larger max_tokens"):
        tokenize_blocks(words(0, 100), tokenizer, seq_len=10, max_tokens=15)
    with pytest.raises(TextError, match=r"gives 0 tokens"):
        tokenize_blocks("", tokenizer, seq_len=10)
    assert tokenize_blocks(words(0, 25), tokenizer, seq_len=10, min_blocks=2).shape == (2, 10)


def test_split_counts_follow_the_documented_rule():
    assert held_out(100, 0.05) == 5 and held_out(30, 0.05) == 2 and held_out(10, 0.05) == 1
    assert held_out(100, 0.0) == 0 and held_out(3, 0.01) == 1        # at least one block when asked for
    assert split_counts(100, 0.05, 0.05) == (90, 5, 5)
    assert split_counts(3, 0.05, 0.05) == (1, 1, 1)
    assert split_counts(2, 0.0, 0.3) == (1, 0, 1)
    with pytest.raises(TextError, match=r"2 block\(s\) cannot give 1 validation and 1 test"):
        split_counts(2, 0.05, 0.05)
    assert blocks_needed(TextConfig(path="x")) == 3
    assert blocks_needed(TextConfig(path="x", val_fraction=0.0)) == 2


def test_splits_are_disjoint_cover_every_block_and_depend_only_on_the_seed():
    blocks = torch.arange(40 * 4).view(40, 4)
    cfg = TextConfig(path="unused", seq_len=4, val_fraction=0.1, test_fraction=0.2)
    s = split_blocks(blocks, cfg, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (28, 4, 8)
    rows = [set(i.tolist()) for i in (s.train_index, s.val_index, s.test_index)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert set.union(*rows) == set(range(40))
    for split, index in ((s.train, s.train_index), (s.val, s.val_index), (s.test, s.test_index)):
        assert torch.equal(split, blocks[index])
    again, other = split_blocks(blocks, cfg, seed=3), split_blocks(blocks, cfg, seed=4)
    assert all(torch.equal(getattr(s, k), getattr(again, k)) for k in ("train", "val", "test"))
    assert not torch.equal(s.test_index, other.test_index)


def test_calibration_blocks_come_from_train_only_and_are_seeded():
    blocks = torch.arange(50 * 3).view(50, 3)
    s = split_blocks(blocks, TextConfig(path="unused", val_fraction=0.2, test_fraction=0.2), seed=0)
    calib = calibration_blocks(s, 8, seed=1)
    train_rows = {tuple(r) for r in s.train.tolist()}
    assert calib.shape == (8, 3) and all(tuple(r) in train_rows for r in calib.tolist())
    assert len({tuple(r) for r in calib.tolist()}) == 8                       # without replacement
    assert torch.equal(calib, calibration_blocks(s, 8, seed=1))
    assert not torch.equal(calib, calibration_blocks(s, 8, seed=2))
    assert calibration_blocks(s, 1000, seed=1).shape == (len(s.train), 3)     # capped at the training blocks
    with pytest.raises(TextError, match="calibration_samples"):
        calibration_blocks(s, 0, seed=1)


def test_the_loader_batches_every_block_and_shuffles_by_seed():
    blocks = torch.arange(10 * 2).view(10, 2)
    plain = block_loader(blocks, 4, shuffle=False)
    assert len(plain) == 3 and [b.shape[0] for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat(list(plain)), blocks)
    assert len(block_loader(blocks, 4, shuffle=False, drop_last=True)) == 2
    a, b = block_loader(blocks, 4, shuffle=True, seed=7), block_loader(blocks, 4, shuffle=True, seed=7)
    first = torch.cat(list(a))
    assert sorted(first[:, 0].tolist()) == list(range(0, 20, 2)) and not torch.equal(first, blocks)
    assert torch.equal(first, torch.cat(list(b)))
    assert not torch.equal(first, torch.cat(list(a)))                         # a new permutation every pass
    with pytest.raises(TextError, match="batch_size"):
        block_loader(blocks, 0, shuffle=False)


def test_a_folder_of_text_becomes_splits_end_to_end(tmp_path, tokenizer):
    (tmp_path / "1.txt").write_text(words(0, 150))
    (tmp_path / "2.txt").write_text(words(150, 300))
    cfg = TextConfig(path=str(tmp_path), seq_len=20, max_tokens=250, val_fraction=0.1, test_fraction=0.1)
    blocks = load_blocks(cfg, tokenizer)
    assert blocks.shape == (12, 20) and torch.equal(blocks.flatten(), torch.arange(1, 241))
    s = load_text_splits(cfg, tokenizer, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 1, 1)
