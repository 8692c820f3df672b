"""Datasets as in-memory tensors, split into train / validation / test, and a fast batch loader.

digits (scikit-learn, ships offline), npz (x_train, y_train, x_test, y_test), imagefolder (train/ and
test/ folders), cifar10 / cifar100 / mnist / fashion_mnist (torchvision, from a local root; nothing is
downloaded), synthetic (fixed-seed random data with a learnable signal). The validation split is
`val_fraction` of the training set, stratified by the job's seed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "npz",
                             "synthetic")
NEEDS_PATH = frozenset({"imagefolder", "npz"})
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


class DataError(ValueError):
    """A dataset that is unknown, missing or malformed."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    path: str | None = None
    val_fraction: float = 0.1
    batch_size: int = 128
    augment: bool = False


@dataclass(frozen=True)
class TensorSplit:
    x: Tensor            # float32 (N, C, H, W), normalised
    y: Tensor            # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    in_shape: tuple[int, int, int]


def default_root() -> Path:
    return Path(os.environ.get("LADLE_DATA", Path.home() / ".ladle" / "data")).expanduser()


def check_data(cfg: DataConfig) -> None:
    """Cheap validation for job specs: a known name, and a path that exists where one is needed."""
    if cfg.name not in DATASETS:
        raise DataError(f"data.name: unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.name in NEEDS_PATH and not cfg.path:
        raise DataError(f"data.path: dataset {cfg.name!r} needs a path")
    if cfg.path and not Path(cfg.path).expanduser().exists():
        raise DataError(f"data.path {cfg.path!r} does not exist")
    if not 0.0 <= cfg.val_fraction <= 0.5:
        raise DataError(f"data.val_fraction must be in [0, 0.5], got {cfg.val_fraction}")


# ---------------------------------------------------------------- raw arrays (x: N,C,H,W float, y: N int)

def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held-out) with about `fraction` of every class held out, shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        held.append(idx[:round(fraction * len(idx))])
    held_idx = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(y)), held_idx)
    return rest, held_idx


def _to_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 4:
        return x
    raise DataError(f"images must be (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {x.shape}")


def _digits(seed: int):
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = d.images.astype(np.float32)[:, None] / 16.0, d.target.astype(np.int64)
    train, test = _stratified_split(y, 0.2, seed)
    return x[train], y[train], x[test], y[test]


def _npz(path: str):
    try:
        with np.load(Path(path).expanduser()) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise DataError(f"data.path {path}: missing arrays {missing} (needs x_train, y_train, x_test, y_test)")
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"data.path {path}: not a readable .npz file ({e})") from None
    x_tr, y_tr, x_te, y_te = arrays
    scale = 255.0 if x_tr.dtype == np.uint8 else 1.0
    return (_to_nchw(x_tr).astype(np.float32) / scale, y_tr.astype(np.int64),
            _to_nchw(x_te).astype(np.float32) / scale, y_te.astype(np.int64))


def _image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
                xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)
                ys.append(c)
    if not xs:
        raise DataError(f"data.path {root}: no images found")
    if len({x.shape for x in xs}) > 1:
        raise DataError(f"data.path {root}: images differ in size ({sorted({x.shape for x in xs})[:3]}...)")
    return np.stack(xs).transpose(0, 3, 1, 2), np.array(ys, dtype=np.int64), classes


def _imagefolder(path: str):
    root = Path(path).expanduser()
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"data.path {root}: needs train/ and test/ (or val/) folders of class folders")
    x_tr, y_tr, classes = _image_folder(root / "train")
    x_te, y_te, test_classes = _image_folder(test_dir)
    if test_classes != classes:
        raise DataError(f"data.path {root}: train/ and {test_dir.name}/ have different class folders")
    return x_tr, y_tr, x_te, y_te


def _torchvision(name: str, path: str | None):
    import torchvision
    root = Path(path).expanduser() if path else default_root()
    cls = getattr(torchvision.datasets, TORCHVISION[name])
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as e:
        raise DataError(f"dataset {name} not found under {root} ({e}); put the files there (set data.path): "
                        "downloading is only possible where the network allows") from None

    def arrays(ds):
        x = np.asarray(ds.data)
        return _to_nchw(x).astype(np.float32) / 255.0, np.asarray(ds.targets, dtype=np.int64)
    return (*arrays(train), *arrays(test))


def _synthetic(seed: int = 1234, n_train: int = 2000, n_test: int = 500, classes: int = 10,
               shape: tuple[int, int, int] = (1, 8, 8)):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (classes, *shape)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, classes, n)
        return (means[y] + rng.normal(0, 1.5, (n, *shape))).astype(np.float32), y.astype(np.int64)
    return (*draw(n_train), *draw(n_test))


@functools.lru_cache(maxsize=8)
def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Train / val / test tensors for `cfg`; the splits depend on `seed` (cached per process)."""
    check_data(cfg)
    if cfg.name == "digits":
        x_tr, y_tr, x_te, y_te = _digits(seed)
    elif cfg.name == "npz":
        x_tr, y_tr, x_te, y_te = _npz(cfg.path)
    elif cfg.name == "imagefolder":
        x_tr, y_tr, x_te, y_te = _imagefolder(cfg.path)
    elif cfg.name == "synthetic":
        x_tr, y_tr, x_te, y_te = _synthetic()
    else:
        x_tr, y_tr, x_te, y_te = _torchvision(cfg.name, cfg.path)
    rest, val = _stratified_split(y_tr, cfg.val_fraction, seed + 1)
    mean = x_tr[rest].mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr[rest].std(axis=(0, 2, 3), keepdims=True) + 1e-6

    def split(x, y) -> TensorSplit:
        return TensorSplit(torch.from_numpy(np.ascontiguousarray((x - mean) / std)), torch.from_numpy(y))
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Splits(train=split(x_tr[rest], y_tr[rest]), val=split(x_tr[val], y_tr[val]), test=split(x_te, y_te),
                  num_classes=num_classes, in_shape=tuple(int(s) for s in x_tr.shape[1:]))


# ---------------------------------------------------------------- loader

class TensorLoader:
    """Batches over in-memory tensors. shuffle: a new permutation every pass, drawn from a generator
    seeded by `seed` (the same seed gives the same sequence of batches); otherwise a fixed order.
    augment: random translations (pad size//8, random crop) and, for 3-channel images, flips."""

    def __init__(self, split: TensorSplit, batch_size: int, *, shuffle: bool, seed: int = 0,
                 augment: bool = False, drop_last: bool = False):
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.augment, self.drop_last = augment, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        pad = max(1, min(h, w) // 8)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=self.generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=self.generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
        out = padded.gather(2, rows)                                   # (n, c, h, w + 2 pad)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
        out = out.gather(3, cols)                                      # (n, c, h, w)
        if c == 3:
            flip = torch.rand(n, generator=self.generator) < 0.5
            out[flip] = out[flip].flip(3)
        return out

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.split.x[idx], self.split.y[idx]
            yield (self._augment(x) if self.augment else x), y


def make_loader(split: TensorSplit, batch_size: int, *, shuffle: bool, seed: int = 0, augment: bool = False,
                drop_last: bool = False) -> TensorLoader:
    return TensorLoader(split, batch_size, shuffle=shuffle, seed=seed, augment=augment, drop_last=drop_last)
