"""Datasets from real files (digits, npz, PNG folders, MNIST idx files) and the seeded batch loader."""

import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from workers.data import DATASETS, NEEDS_PATH, DataConfig, DataError, TensorSplit, check_data, load_splits, make_loader

DIGITS = DataConfig(val_fraction=0.1)


def counting_split(n: int, shape=(1, 4, 4)) -> TensorSplit:
    """A split whose every pixel of image i equals i, so batches show which examples they hold."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, *shape).contiguous()
    return TensorSplit(images, torch.arange(n) % 3, torch.arange(n), torch.zeros(1, shape[0], 1, 1),
                       torch.ones(1, shape[0], 1, 1))


def ids(batches) -> torch.Tensor:
    """The example ids of a pass over a `counting_split` loader, in order."""
    return torch.cat([x[:, 0, 0, 0].long() for x, _ in batches])


# ---------------------------------------------------------------- digits

def test_digits_splits_partition_the_dataset():
    s = load_splits(DIGITS, 0)
    assert (s.num_classes, s.in_shape) == (10, (1, 8, 8))
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    rows = torch.cat([s.train.index, s.val.index, s.test.index])
    assert torch.equal(rows.sort().values, torch.arange(1797))            # every image in exactly one split
    assert len(s.test) == pytest.approx(0.2 * 1797, abs=5)
    assert len(s.val) == pytest.approx(0.1 * (1797 - len(s.test)), abs=5)


def test_digits_splits_hold_the_original_images_and_labels():
    from sklearn.datasets import load_digits
    d = load_digits()
    s = load_splits(DIGITS, 0)
    for split in (s.train, s.val, s.test):
        assert torch.equal(split.y, torch.from_numpy(d.target[split.index.numpy()]))
        expected = torch.from_numpy(d.images[split.index.numpy()]).float()[:, None] / 16
        assert torch.allclose(split.images, expected)


def test_digits_splits_are_stratified():
    s = load_splits(DIGITS, 0)
    overall = torch.bincount(torch.cat([s.train.y, s.val.y, s.test.y]), minlength=10).float() / 1797
    for split in (s.train, s.val, s.test):
        share = torch.bincount(split.y, minlength=10).float() / len(split)
        assert (share - overall).abs().max() < 0.01


def test_digits_splits_are_determined_by_the_seed():
    a, b, c = load_splits(DIGITS, 0), load_splits(DataConfig(val_fraction=0.1, batch_size=7), 0), load_splits(DIGITS, 1)
    load_splits.cache_clear()
    fresh = load_splits(DIGITS, 0)                                         # recomputed, not the cached copy
    assert fresh is not a
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(fresh, name).index, getattr(a, name).index)
        assert torch.equal(getattr(b, name).index, getattr(a, name).index)   # batch size does not matter
        assert not torch.equal(getattr(c, name).index.sort().values, getattr(a, name).index.sort().values)


def test_training_split_is_normalised():
    x = load_splits(DIGITS, 0).train.x
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_val_fraction_zero_gives_an_empty_val_split_that_loads_nothing():
    s = load_splits(DataConfig(val_fraction=0.0), 0)
    assert len(s.val) == 0 and s.val.x.shape == (0, 1, 8, 8)
    loader = make_loader(s.val, 32, shuffle=True, augment=True)
    assert len(loader) == 0 and list(loader) == []
    assert len(s.train) + len(s.test) == 1797


def test_synthetic_data_is_fixed_and_learnable():
    s = load_splits(DataConfig(name="synthetic"), 0)
    assert (s.num_classes, s.in_shape, len(s.train) + len(s.val), len(s.test)) == (10, (1, 8, 8), 2000, 500)
    assert torch.equal(load_splits(DataConfig(name="synthetic"), 5).test.images, s.test.images)
    means = torch.stack([s.train.x[s.train.y == c].mean(0) for c in range(10)])
    pred = torch.cdist(s.test.x.flatten(1), means.flatten(1)).argmin(1)
    assert float((pred == s.test.y).float().mean()) > 0.5                    # chance is 0.1


# ---------------------------------------------------------------- loader

def test_shuffled_loader_covers_every_example_once_per_epoch_in_a_new_order():
    split = counting_split(103)
    loader = make_loader(split, 10, shuffle=True, seed=3)
    assert len(loader) == 11
    epochs = [ids(loader) for _ in range(3)]
    for order in epochs:
        assert torch.equal(order.sort().values, torch.arange(103))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert [len(y) for _, y in loader] == [10] * 10 + [3]


def test_shuffling_is_determined_by_the_seed():
    split = counting_split(100)
    a, b, c = (make_loader(split, 16, shuffle=True, seed=s) for s in (3, 3, 4))
    first, second = [ids(a) for _ in range(2)], [ids(b) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))            # same seed: same batches, every epoch
    assert not torch.equal(first[0], ids(c))


def test_labels_travel_with_their_images():
    split = counting_split(50)                                               # label of example i is i % 3
    for x, y in make_loader(split, 8, shuffle=True, seed=1, augment=False):
        assert torch.equal(y, x[:, 0, 0, 0].long() % 3)


def test_unshuffled_loader_keeps_the_fixed_order():
    s = load_splits(DIGITS, 0)
    loader = make_loader(s.train, 64, shuffle=False)
    for _ in range(2):
        xs, ys = zip(*loader)
        assert torch.equal(torch.cat(xs), s.train.x) and torch.equal(torch.cat(ys), s.train.y)


def test_training_split_order_is_mixed_so_the_first_unshuffled_batch_sees_every_class(tmp_path):
    y = np.repeat(np.arange(4), 50)                                          # a class-sorted source
    np.savez(tmp_path / "sorted.npz", x_train=np.zeros((200, 4, 4), np.uint8), y_train=y,
             x_test=np.zeros((8, 4, 4), np.uint8), y_test=np.arange(8) % 4)
    s = load_splits(DataConfig(name="npz", path=str(tmp_path / "sorted.npz")), 0)
    _, first = next(iter(make_loader(s.train, 20, shuffle=False)))
    assert len(torch.unique(first)) == 4


def test_drop_last():
    loader = make_loader(counting_split(103), 10, shuffle=True, drop_last=True)
    assert len(loader) == 10 and [len(y) for _, y in loader] == [10] * 10


def test_bad_batch_size():
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        make_loader(counting_split(4), 0, shuffle=False)


def windows(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every translation of `image` by up to `pad` pixels, zero-filled (pad and crop)."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    return [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]


def test_augment_translates_grayscale_images_without_flipping():
    s = load_splits(DIGITS, 0)
    x, y = next(iter(make_loader(s.train, 64, shuffle=False, augment=True, seed=1)))
    assert x.shape == (64, 1, 8, 8) and torch.equal(y, s.train.y[:64])
    assert (x != s.train.x[:64]).flatten(1).any(1).float().mean() > 0.5     # most images moved
    for i in range(64):                                                      # pad = 8 // 8 = 1
        assert any(torch.equal(x[i], w) for w in windows(s.train.x[i], 1))


def test_augment_translates_and_flips_color_images_deterministically():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 16, 16)
    split = TensorSplit(images, torch.zeros(64, dtype=torch.long), torch.arange(64),
                        torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    x, _ = next(iter(make_loader(split, 64, shuffle=False, augment=True, seed=2)))
    assert x.shape == images.shape
    flipped = 0
    for i in range(64):                                                      # pad = 16 // 8 = 2
        plain = any(torch.equal(x[i], w) for w in windows(images[i], 2))
        mirrored = any(torch.equal(x[i], w) for w in windows(images[i].flip(2), 2))
        assert plain or mirrored
        flipped += mirrored
    assert 10 < flipped < 54
    again, _ = next(iter(make_loader(split, 64, shuffle=False, augment=True, seed=2)))
    other, _ = next(iter(make_loader(split, 64, shuffle=False, augment=True, seed=3)))
    assert torch.equal(x, again) and not torch.equal(x, other)


# ---------------------------------------------------------------- npz

LAYOUTS = {"nhwc": (6, 5, 3), "nchw": (3, 6, 5), "nhw": (6, 5), "nhwc1": (6, 5, 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_npz_round_trip(tmp_path, layout, dtype):
    rng = np.random.default_rng(0)
    arrays = {"x_train": (rng.random((40, *LAYOUTS[layout])) * 255).astype(dtype), "y_train": np.arange(40) % 4,
              "x_test": (rng.random((12, *LAYOUTS[layout])) * 255).astype(dtype), "y_test": np.arange(12) % 5}
    np.savez(tmp_path / "d.npz", **arrays)
    s = load_splits(DataConfig(name="npz", path=str(tmp_path / "d.npz"), val_fraction=0.25), 0)
    channels = 3 if layout in ("nhwc", "nchw") else 1
    assert s.in_shape == (channels, 6, 5) and s.num_classes == 5
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 12)

    def nchw(x: np.ndarray) -> torch.Tensor:
        if layout == "nhw":
            x = x[:, None]
        elif layout != "nchw":
            x = x.transpose(0, 3, 1, 2)
        return torch.from_numpy(x.astype(np.float32))

    assert torch.equal(s.test.images.float(), nchw(arrays["x_test"]))
    assert torch.equal(s.test.y, torch.from_numpy(arrays["y_test"]))
    for split in (s.train, s.val):
        assert torch.equal(split.images.float(), nchw(arrays["x_train"])[split.index])
        assert torch.equal(split.y, torch.from_numpy(arrays["y_train"])[split.index])
    assert (s.train.images.dtype == torch.uint8) == (dtype == np.uint8)      # 8-bit data stays compact


def test_npz_errors_name_the_problem(tmp_path):
    x, y = np.zeros((8, 4, 4), np.uint8), np.arange(8) % 2
    np.savez(tmp_path / "partial.npz", x_train=x, y_train=y)
    with pytest.raises(DataError, match=r"missing arrays \['x_test', 'y_test'\]"):
        load_splits(DataConfig(name="npz", path=str(tmp_path / "partial.npz")), 0)
    np.savez(tmp_path / "short.npz", x_train=x, y_train=y[:5], x_test=x, y_test=y)
    with pytest.raises(DataError, match="y_train: labels must be a 1-d array with one label per image"):
        load_splits(DataConfig(name="npz", path=str(tmp_path / "short.npz")), 0)
    np.savez(tmp_path / "sizes.npz", x_train=x, y_train=y, x_test=np.zeros((8, 5, 5)), y_test=y)
    with pytest.raises(DataError, match="x_train images are .* but x_test images are"):
        load_splits(DataConfig(name="npz", path=str(tmp_path / "sizes.npz")), 0)
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_splits(DataConfig(name="npz", path=str(tmp_path / "junk.npz")), 0)


# ---------------------------------------------------------------- imagefolder

def write_images(root, mode: str, counts: dict[str, int], size=(10, 7)) -> dict:
    """PNG files root/<split>/<class>/<i>.png; returns {split: [(pixels, class index)]} in sorted-file order."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in counts.items():
        written[split] = []
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]),
                                      dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
                written[split].append((pixels, c))
    return written


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_imagefolder_loads_the_pixels(tmp_path, mode, channels):
    written = write_images(tmp_path, mode, {"train": 6, "val": 2})
    s = load_splits(DataConfig(name="imagefolder", path=str(tmp_path), val_fraction=0.0), 0)
    assert s.in_shape == (channels, 7, 10) and s.num_classes == 2
    assert (len(s.train), len(s.val), len(s.test)) == (12, 0, 4)
    assert s.test.images.dtype == torch.uint8
    for i, (pixels, label) in enumerate(written["val"]):                     # the test split keeps file order
        expected = pixels.transpose(2, 0, 1) if mode == "RGB" else pixels[None]
        assert np.array_equal(s.test.images[i].numpy(), expected) and int(s.test.y[i]) == label
    for i, row in enumerate(s.train.index.tolist()):
        pixels, label = written["train"][row]
        assert np.array_equal(s.train.images[i].numpy(), pixels.transpose(2, 0, 1) if mode == "RGB" else pixels[None])


def test_imagefolder_errors(tmp_path):
    write_images(tmp_path, "RGB", {"train": 3, "test": 1})
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match="differ in size"):
        load_splits(DataConfig(name="imagefolder", path=str(tmp_path)), 0)
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match="needs train/ and test/ \\(or val/\\)"):
        check_data(DataConfig(name="imagefolder", path=str(tmp_path / "only")))


# ---------------------------------------------------------------- torchvision datasets from a local root

def write_idx(path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header, uint8 data), as torchvision reads it."""
    path.write_bytes(struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_dataset_from_a_local_root(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    x_train, x_test = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", x_train)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(30) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", x_test)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    s = load_splits(DataConfig(name=name, path=str(tmp_path), val_fraction=0.0), 0)
    assert s.in_shape == (1, 28, 28) and s.num_classes == 10 and (len(s.train), len(s.test)) == (30, 10)
    assert np.array_equal(s.test.images[:, 0].numpy(), x_test) and torch.equal(s.test.y, torch.arange(10))
    assert np.array_equal(s.train.images[:, 0].numpy(), x_train[s.train.index.numpy()])


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_torchvision_dataset_missing_from_its_root_says_where_and_does_not_download(tmp_path, name):
    with pytest.raises(DataError, match=f"dataset {name} not found under {re.escape(str(tmp_path))}") as e:
        load_splits(DataConfig(name=name, path=str(tmp_path)), 0)
    assert "download" in str(e.value) and list(tmp_path.iterdir()) == []


def test_torchvision_datasets_default_to_ladle_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LADLE_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "data"))):
        load_splits(DataConfig(name="cifar10"), 0)


# ---------------------------------------------------------------- check_data

@pytest.mark.parametrize("cfg,words", [
    (DataConfig(name="imagenet"), r"data.name: unknown dataset 'imagenet'; known: digits, cifar10, .*synthetic"),
    (DataConfig(name="npz"), "data.path: dataset 'npz' needs a path"),
    (DataConfig(name="imagefolder"), "data.path: dataset 'imagefolder' needs a path"),
    (DataConfig(name="npz", path="/no/such.npz"), "data.path '/no/such.npz' does not exist"),
    (DataConfig(name="cifar10", path="/no/such/root"), "data.path '/no/such/root' does not exist"),
    (DataConfig(val_fraction=0.9), r"data.val_fraction must be in \[0, 0.5\], got 0.9"),
    (DataConfig(val_fraction=-0.1), r"data.val_fraction must be in \[0, 0.5\]"),
    (DataConfig(batch_size=0), "data.batch_size must be a positive integer"),
])
def test_check_data_names_the_field(cfg, words):
    with pytest.raises(DataError, match=words):
        check_data(cfg)
    with pytest.raises(DataError, match=words):
        load_splits(cfg, 0)


def test_check_data_wants_the_right_kind_of_path(tmp_path):
    with pytest.raises(DataError, match="is not a file"):
        check_data(DataConfig(name="npz", path=str(tmp_path)))
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match="is not a directory"):
        check_data(DataConfig(name="cifar10", path=str(tmp_path / "f")))
    for name in set(DATASETS) - NEEDS_PATH - {"cifar10", "cifar100", "mnist", "fashion_mnist"}:
        check_data(DataConfig(name=name))                                     # digits, synthetic need nothing
