import numpy as np
import pytest
import torch
from PIL import Image

from workers.data import DataConfig, DataError, check_data, load_splits, make_loader


def test_digits_splits_are_disjoint_stratified_and_seeded():
    s = load_splits(DataConfig(val_fraction=0.1), 0)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert s.num_classes == 10 and s.in_shape == (1, 8, 8)
    assert len(s.test) == pytest.approx(0.2 * 1797, abs=10) and len(s.val) == pytest.approx(0.1 * 1438, abs=10)
    # no image appears in two splits (digits has a few duplicate images, so compare with counts)
    rows = {split: {tuple(x.flatten().tolist()) for x in getattr(s, split).x} for split in ("train", "val", "test")}
    assert len(rows["train"] & rows["test"]) <= 5 and len(rows["val"] & rows["test"]) <= 5
    for split in (s.val, s.test):       # every class is represented about evenly
        counts = torch.bincount(split.y, minlength=10).float()
        assert counts.min() >= 0.7 * counts.mean()
    again, other = load_splits(DataConfig(val_fraction=0.1), 0), load_splits(DataConfig(val_fraction=0.1), 1)
    assert torch.equal(again.test.y, s.test.y)
    assert not torch.equal(other.test.x, s.test.x)


def test_training_split_is_normalised():
    s = load_splits(DataConfig(), 0)
    assert abs(float(s.train.x.mean())) < 0.05 and abs(float(s.train.x.std()) - 1) < 0.05


def test_loader_covers_each_example_once_per_epoch_and_reshuffles():
    s = load_splits(DataConfig(), 0)
    loader = make_loader(s.train, 100, shuffle=True, seed=3)
    assert len(loader) == -(-len(s.train) // 100)
    epochs = [torch.cat([y for _, y in loader]) for _ in range(2)]
    for ys in epochs:
        assert len(ys) == len(s.train)
        assert torch.equal(torch.bincount(ys, minlength=10), torch.bincount(s.train.y, minlength=10))
    first = [y for _, y in make_loader(s.train, 100, shuffle=True, seed=3)]
    second = [y for _, y in make_loader(s.train, 100, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))        # same seed, same batches
    third = [y for _, y in make_loader(s.train, 100, shuffle=True, seed=4)]
    assert not all(torch.equal(a, b) for a, b in zip(first, third))
    assert not torch.equal(epochs[0], epochs[1])                         # a new order every epoch


def test_unshuffled_loader_keeps_order():
    s = load_splits(DataConfig(), 0)
    xs = torch.cat([x for x, _ in make_loader(s.train, 64, shuffle=False)])
    assert torch.equal(xs, s.train.x)


def test_augment_shifts_pixels_and_keeps_shapes():
    s = load_splits(DataConfig(), 0)
    x, _ = next(iter(make_loader(s.train, 64, shuffle=False, augment=True, seed=1)))
    assert x.shape == (64, 1, 8, 8)
    assert not torch.equal(x, s.train.x[:64])
    # each augmented image is a translated copy: its pixels come from the padded original
    pad = 1
    for i in range(8):
        padded = torch.nn.functional.pad(s.train.x[i], (pad,) * 4)
        windows = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(x[i], w) for w in windows)


def test_empty_split_yields_nothing():
    s = load_splits(DataConfig(val_fraction=0.0), 0)
    assert len(s.val) == 0 and list(make_loader(s.val, 32, shuffle=False)) == []


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
def test_npz_round_trip(tmp_path, layout):
    rng = np.random.default_rng(0)
    shapes = {"nhwc": (6, 6, 3), "nchw": (3, 6, 6), "nhw": (6, 6)}[layout]
    arrays = {"x_train": rng.integers(0, 255, (40, *shapes), dtype=np.uint8), "y_train": np.arange(40) % 4,
              "x_test": rng.integers(0, 255, (12, *shapes), dtype=np.uint8), "y_test": np.arange(12) % 4}
    np.savez(tmp_path / "d.npz", **arrays)
    s = load_splits(DataConfig(name="npz", path=str(tmp_path / "d.npz"), val_fraction=0.25), 0)
    assert s.in_shape == ((1, 6, 6) if layout == "nhw" else (3, 6, 6))
    assert s.num_classes == 4 and len(s.test) == 12 and len(s.train) + len(s.val) == 40
    np.savez(tmp_path / "bad.npz", x_train=arrays["x_train"], y_train=arrays["y_train"])
    with pytest.raises(DataError, match=r"missing arrays \['x_test', 'y_test'\]"):
        load_splits(DataConfig(name="npz", path=str(tmp_path / "bad.npz")), 0)


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    s = load_splits(DataConfig(name="imagefolder", path=str(tmp_path), val_fraction=0.0), 0)
    assert s.in_shape == (3, 10, 10) and s.num_classes == 2 and len(s.train) == 12 and len(s.test) == 4
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match="differ in size"):
        load_splits(DataConfig(name="imagefolder", path=str(tmp_path), val_fraction=0.05), 0)


def test_torchvision_dataset_from_a_missing_root_says_where(tmp_path):
    with pytest.raises(DataError, match=f"cifar10 not found under {tmp_path}"):
        load_splits(DataConfig(name="cifar10", path=str(tmp_path)), 0)


def test_synthetic_has_a_learnable_signal():
    s = load_splits(DataConfig(name="synthetic"), 0)
    assert s.num_classes == 10 and len(s.test) == 500
    # nearest class mean on the training split beats chance by far
    means = torch.stack([s.train.x[s.train.y == c].mean(0) for c in range(10)])
    pred = torch.cdist(s.test.x.flatten(1), means.flatten(1)).argmin(1)
    assert float((pred == s.test.y).float().mean()) > 0.5


@pytest.mark.parametrize("cfg,words", [
    (DataConfig(name="imagenet"), "data.name: unknown dataset"),
    (DataConfig(name="npz"), "data.path: dataset 'npz' needs a path"),
    (DataConfig(name="npz", path="/no/such.npz"), "data.path '/no/such.npz' does not exist"),
    (DataConfig(val_fraction=0.9), "data.val_fraction"),
])
def test_check_data_names_the_field(cfg, words):
    with pytest.raises(DataError, match=words):
        check_data(cfg)
