import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.workers.tiny import MODELS
from workers.checkpoint import Checkpoint, CheckpointError, load, save
from workers.pruning import prune


def make_ckpt() -> Checkpoint:
    torch.manual_seed(0)
    result = prune(MODELS["cnn"](), None, 0.5)
    return Checkpoint(state=result.model.state_dict(), masks=result.masks,
                      meta={"arch": "cnn", "phase": 1, "spec": {"seed": 0}, "in_shape": [1, 4, 4]})


def test_round_trip_is_bit_exact(tmp_path):
    ckpt = make_ckpt()
    size, sha = save(tmp_path / "m.safetensors", ckpt)
    assert size == os.path.getsize(tmp_path / "m.safetensors") and len(sha) == 64
    back = load(tmp_path / "m.safetensors")
    assert back.meta == ckpt.meta
    assert set(back.state) == set(ckpt.state) and set(back.masks) == set(ckpt.masks)
    for k, v in ckpt.state.items():
        assert back.state[k].dtype == v.dtype and torch.equal(back.state[k], v), k
    for k, v in ckpt.masks.items():
        assert back.masks[k].dtype == torch.bool and torch.equal(back.masks[k], v), k
    model = MODELS["cnn"]()
    model.load_state_dict(back.state)      # everything needed to rebuild the model


def test_corrupted_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save(path, make_ckpt())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF                      # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save(path, make_ckpt())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable"):
        load(path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a Ladle checkpoint"):
        load(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load(tmp_path / "missing.safetensors")


def test_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "m.safetensors"
    save(path, make_ckpt())
    save(path, make_ckpt())                # overwrite
    assert os.listdir(path.parent) == ["m.safetensors"]
    assert load(path).meta["arch"] == "cnn"


class HalfWritten:
    """A file that takes half of what is written to it, then calls `fail` (a full disk, say)."""

    def __init__(self, f, fail):
        self.f, self.fail = f, fail

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        self.fail()

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("fails", ["write", "fsync", "replace"])
def test_a_write_that_fails_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, fails):
    path = tmp_path / "m.safetensors"
    save(path, make_ckpt())
    old = path.read_bytes()
    new = make_ckpt()
    new.meta["phase"] = 2
    temp = []                                   # the temp file as it was when the write failed

    def fail(*args):
        temp.extend((p.name, p.stat().st_size) for p in tmp_path.iterdir() if p != path)
        raise OSError(errno.ENOSPC, f"{fails}: no space left on device")

    if fails == "write":
        fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWritten(fdopen(fd, mode), fail))
    else:
        monkeypatch.setattr(os, fails, fail)
    with pytest.raises(OSError, match=f"{fails}: no space left"):
        save(path, new)
    monkeypatch.undo()
    [(name, size)] = temp
    assert name.startswith(".m.safetensors.") and name.endswith(".tmp") and size > 0
    assert path.read_bytes() == old and load(path).meta["phase"] == 1
    assert os.listdir(tmp_path) == ["m.safetensors"]
