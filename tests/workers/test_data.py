"""Datasets from real files (digits, npz, PNG folders, MNIST IDX files, Debian's Fashion-MNIST) and the seeded
batch loader."""

import gzip
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from workers import data
from workers.data import (DATASETS, NEEDS_PATH, DataConfig, DataError, TensorSplit, check_data, default_augment,
                          find_idx_dataset, load_splits, make_loader, read_idx, search_roots)
from workers.evaluate import evaluate
from workers.models import build_model
from workers.schedules import dense_schedule
from workers.train import train

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


# ---------------------------------------------------------------- mnist / fashion_mnist: IDX files

CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
         np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes, written from the format's description: 0x0000, a type code, the number of
    dimensions, one big-endian uint32 per dimension, then the values big-endian."""
    big = array.astype(array.dtype.newbyteorder(">"))
    return (bytes([0, 0, CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + big.tobytes())


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """`array` as an IDX file at `path` (gzip'd as path + '.gz' when `gz`)."""
    data = idx_bytes(array)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(folder, n_train: int, n_test: int, gz: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The four MNIST IDX files in `folder` (made if needed): random uint8 28x28 images, labels i % 10.
    Returns (train images, test images)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    x_train, x_test = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (n_train, n_test))
    write_idx(folder / "train-images-idx3-ubyte", x_train, gz)
    write_idx(folder / "train-labels-idx1-ubyte", (np.arange(n_train) % 10).astype(np.uint8), gz)
    write_idx(folder / "t10k-images-idx3-ubyte", x_test, gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", (np.arange(n_test) % 10).astype(np.uint8), gz)
    return x_train, x_test


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Every place an IDX dataset is looked for, moved under tmp_path and empty: the Debian folder
    (tmp_path/debian), $LADLE_DATA (unset; tmp_path/env is free for it) and ~ (tmp_path/home)."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.delenv("LADLE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="module")
def debian_fashion_mnist():
    """The folder of Debian's package dataset-fashion-mnist (installed by `make test`)."""
    if not (data.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Debian's package dataset-fashion-mnist is not installed (no {data.DEBIAN_FASHION_MNIST}): "
                    "apt-get install dataset-fashion-mnist, or run `make test`, which does")
    return data.DEBIAN_FASHION_MNIST


def test_fashion_mnist_loads_from_debians_package(debian_fashion_mnist, monkeypatch):
    monkeypatch.delenv("LADLE_DATA", raising=False)
    found = find_idx_dataset("fashion_mnist", None)
    assert found.folder == debian_fashion_mnist and not found.processed
    s = load_splits(DataConfig(name="fashion_mnist"), 0)
    assert (s.num_classes, s.in_shape) == (10, (1, 28, 28))
    assert (len(s.train) + len(s.val), len(s.val), len(s.test)) == (60000, 6000, 10000)
    for split in (s.train, s.val, s.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 28, 28)
        assert split.y.dtype == torch.int64 and int(split.y.min()) == 0 and int(split.y.max()) == 9
    counts = torch.bincount(torch.cat([s.train.y, s.val.y]), minlength=10)
    assert counts.tolist() == [6000] * 10 and torch.bincount(s.test.y).tolist() == [1000] * 10
    images = read_idx(debian_fashion_mnist / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and torch.equal(s.test.images[:, 0], torch.from_numpy(images))
    assert 0 < float(s.train.mean) < 255 and int(s.train.images.max()) == 255


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type(tmp_path, gz, dtype):
    values = np.arange(60).reshape(3, 4, 5) * 2                               # fits every type
    array = (values if dtype == "u1" else values - 60).astype(dtype)           # signed types get negatives
    write_idx(tmp_path / "a-idx3", array, gz)
    out = read_idx(tmp_path / ("a-idx3.gz" if gz else "a-idx3"))
    assert out.shape == (3, 4, 5) and out.dtype == array.dtype.newbyteorder("=") and np.array_equal(out, array)
    assert out.flags.writeable


def test_read_idx_errors_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    cases = {"magic": b"\x08\x03\x00\x00" + good[4:], "type": good[:2] + b"\x07" + good[3:],
             "empty": b"", "header": good[:6], "short": good[:-1], "long": good + b"\x00"}
    words = {"magic": r"not an IDX file \(magic number 0x08030000", "type": "not an IDX file",
             "empty": "not an IDX file", "header": "IDX header cut short",
             "short": r"IDX header says 2 x 3 values of 1 byte\(s\) \(6 bytes\) but the file holds 5",
             "long": "IDX header says .* but the file holds 7"}
    for case, raw in cases.items():
        (tmp_path / case).write_bytes(raw)
        with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / case))}: {words[case]}"):
            read_idx(tmp_path / case)
    with gzip.open(tmp_path / "magic.gz", "wb") as f:
        f.write(cases["magic"])
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'magic.gz'))}: not an IDX file"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'cut.gz'))}: cannot read"):
        read_idx(tmp_path / "cut.gz")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_dataset_from_a_folder_of_its_files(tmp_path, name, gz):
    x_train, x_test = write_mnist(tmp_path, 30, 10, gz)
    s = load_splits(DataConfig(name=name, path=str(tmp_path), val_fraction=0.0), 0)
    assert s.in_shape == (1, 28, 28) and s.num_classes == 10 and (len(s.train), len(s.test)) == (30, 10)
    assert s.train.images.dtype == torch.uint8 and s.train.y.dtype == torch.int64
    assert np.array_equal(s.test.images[:, 0].numpy(), x_test) and torch.equal(s.test.y, torch.arange(10))
    assert np.array_equal(s.train.images[:, 0].numpy(), x_train[s.train.index.numpy()])
    assert torch.equal(s.train.y, s.train.index % 10)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_dataset_in_torchvisions_raw_layout(tmp_path, name, folder):
    x_train, x_test = write_mnist(tmp_path / folder / "raw", 30, 10)
    s = load_splits(DataConfig(name=name, path=str(tmp_path), val_fraction=0.0), 0)
    assert find_idx_dataset(name, str(tmp_path)).folder == tmp_path / folder / "raw"
    assert (len(s.train), len(s.test)) == (30, 10) and np.array_equal(s.test.images[:, 0].numpy(), x_test)
    assert np.array_equal(s.train.images[:, 0].numpy(), x_train[s.train.index.numpy()])


def test_idx_dataset_in_torchvisions_processed_layout(tmp_path):
    processed = tmp_path / "FashionMNIST" / "processed"
    processed.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x_train, x_test = (torch.from_numpy(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)) for n in (20, 10))
    torch.save((x_train, torch.arange(20) % 10), processed / "training.pt")
    torch.save((x_test, torch.arange(10)), processed / "test.pt")
    found = find_idx_dataset("fashion_mnist", str(tmp_path))
    assert found.processed and found.files == (processed / "training.pt", processed / "test.pt")
    s = load_splits(DataConfig(name="fashion_mnist", path=str(tmp_path), val_fraction=0.0), 0)
    assert torch.equal(s.test.images[:, 0], x_test) and torch.equal(s.test.y, torch.arange(10))
    assert torch.equal(s.train.images[:, 0], x_train[s.train.index]) and s.train.images.dtype == torch.uint8
    torch.save({"not": "a pair"}, processed / "test.pt")
    load_splits.cache_clear()
    with pytest.raises(DataError, match=f"{re.escape(str(processed / 'test.pt'))}: not a torchvision processed file"):
        load_splits(DataConfig(name="fashion_mnist", path=str(tmp_path), val_fraction=0.0), 0)


def test_bad_idx_files_in_a_dataset_name_the_file(tmp_path):
    write_mnist(tmp_path, 20, 10)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 9) + bytes(9))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: labels must be a 1-d array with one label per "
                                        r"image \(10\)"):
        load_splits(DataConfig(name="mnist", path=str(tmp_path)), 0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'train-images-idx3-ubyte'))}: not an IDX file"):
        load_splits(DataConfig(name="mnist", path=str(tmp_path)), 0)


def test_idx_lookup_order_debian_then_ladle_data_then_home(roots, monkeypatch):
    write_mnist(roots / "debian", 20, 10, gz=True)
    write_mnist(roots / "env" / "FashionMNIST" / "raw", 30, 10)
    write_mnist(roots / "home" / ".ladle" / "data", 40, 10)
    monkeypatch.setenv("LADLE_DATA", str(roots / "env"))
    cfg = DataConfig(name="fashion_mnist", val_fraction=0.0)
    assert search_roots("fashion_mnist", None) == [roots / "debian", roots / "env", roots / "home" / ".ladle" / "data"]
    assert search_roots("mnist", None) == [roots / "env", roots / "home" / ".ladle" / "data"]
    assert len(load_splits(cfg, 0).train) == 20                                   # Debian's package first
    mnist = find_idx_dataset("mnist", None).folder              # neither Debian's folder nor FashionMNIST/raw/
    assert mnist == roots / "home" / ".ladle" / "data"
    shutil.rmtree(roots / "debian")
    assert len(load_splits(cfg, 0).train) == 30                                   # then $LADLE_DATA
    monkeypatch.delenv("LADLE_DATA")
    assert len(load_splits(cfg, 0).train) == 40                                   # then ~/.ladle/data
    write_mnist(roots / "debian", 20, 10, gz=True)
    given = DataConfig(name="fashion_mnist", path=str(roots / "env"), val_fraction=0.0)
    assert search_roots("fashion_mnist", given.path) == [roots / "env"]
    assert len(load_splits(given, 0).train) == 30                                 # data.path: that path only
    (roots / "empty").mkdir()
    with pytest.raises(DataError, match=f"data.path: dataset 'fashion_mnist' not found in {roots / 'empty'}"):
        check_data(DataConfig(name="fashion_mnist", path=str(roots / "empty")))


def test_missing_fashion_mnist_names_the_field_the_places_and_the_package(roots, monkeypatch):
    monkeypatch.setenv("LADLE_DATA", str(roots / "env"))
    with pytest.raises(DataError) as e:
        check_data(DataConfig(name="fashion_mnist"))
    message = str(e.value)
    assert message.startswith("data.name: dataset 'fashion_mnist' not found (looked in "
                              f"{roots / 'debian'}, $LADLE_DATA={roots / 'env'}, ~/.ladle/data")
    assert "apt-get install dataset-fashion-mnist" in message and "point data.path at a folder" in message
    assert "train-images-idx3-ubyte.gz" in message
    (roots / "given").mkdir()
    with pytest.raises(DataError, match=r"^data.path: .*apt-get install dataset-fashion-mnist"):
        load_splits(DataConfig(name="fashion_mnist", path=str(roots / "given")), 0)
    assert list((roots / "given").iterdir()) == []                               # nothing downloaded


def test_missing_mnist_says_which_files_and_where(roots):
    with pytest.raises(DataError) as e:
        check_data(DataConfig(name="mnist"))
    message = str(e.value)
    assert message.startswith("data.name: dataset 'mnist' not found (looked in ~/.ladle/data")
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        assert f in message
    assert "$LADLE_DATA" in message and "data.path" in message and "Debian has no MNIST package" in message


def test_check_data_only_looks_for_the_files(roots):
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte"):
        (roots / "junk" / f).parent.mkdir(exist_ok=True)
        (roots / "junk" / f).write_text("not parsed by check_data")
    check_data(DataConfig(name="mnist", path=str(roots / "junk")))                 # cheap: existence only
    with pytest.raises(DataError, match="not an IDX file"):
        load_splits(DataConfig(name="mnist", path=str(roots / "junk")), 0)


@pytest.fixture
def one_thread():
    """One intra-op thread, as an ingredient with cpus_per_ingredient=1 trains (and robust to a busy machine,
    where two spinning threads on two cores run ~7x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_lenet5_learns_fashion_mnist_in_one_epoch(debian_fashion_mnist, one_thread):
    """A real learning check on real data: 1 epoch of LeNet-5 on all 54k training images (~87% test accuracy;
    5-12 s on one core)."""
    s = load_splits(DataConfig(name="fashion_mnist"), 0)
    model = build_model("lenet5", num_classes=s.num_classes, in_shape=s.in_shape)
    loader = make_loader(s.train, 64, shuffle=True, seed=0, augment=DataConfig(name="fashion_mnist").augment)
    history = train(model, loader, dense_schedule("linear", 0.05, len(loader)), epochs=1, seed=0).history
    result = evaluate(model, make_loader(s.test, 1000, shuffle=False))
    assert history[0]["train_accuracy"] > 0.6 and result["accuracy"] > 0.8, (history, result)   # chance: 0.1


# ---------------------------------------------------------------- cifar: torchvision's files from a local root

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_dataset_missing_from_its_root_says_where_and_does_not_download(tmp_path, name):
    with pytest.raises(DataError, match=f"data.path: dataset {name} not found under {re.escape(str(tmp_path))}") as e:
        load_splits(DataConfig(name=name, path=str(tmp_path)), 0)
    assert "download" in str(e.value) and list(tmp_path.iterdir()) == []


def test_torchvision_datasets_default_to_ladle_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LADLE_DATA", str(tmp_path / "data"))
    root = re.escape(str(tmp_path / "data"))
    with pytest.raises(DataError, match=f"data.name: dataset cifar10 not found under {root}"):
        check_data(DataConfig(name="cifar10"))
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    check_data(DataConfig(name="cifar10"))                                          # the folder is there
    with pytest.raises(DataError, match="data.name: dataset cifar10 not found under .*not found or corrupted"):
        load_splits(DataConfig(name="cifar10"), 0)                                  # ... but not its files


# ---------------------------------------------------------------- default augmentation

@pytest.mark.parametrize("name", DATASETS)
def test_augmentation_defaults_to_the_papers_choice_per_dataset(name):
    expected = name in ("cifar10", "cifar100")
    assert default_augment(name) is expected and DataConfig(name=name).augment is expected
    assert DataConfig(name=name, augment=not expected).augment is (not expected)    # explicit wins


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
