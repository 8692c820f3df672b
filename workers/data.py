"""Datasets as in-memory tensors split into train / validation / test, and a fast seeded batch loader.

Datasets: digits (scikit-learn, ships offline), npz (a file with x_train, y_train, x_test, y_test),
imagefolder (train/ and test/ or val/ folders of class folders), mnist / fashion_mnist (the four IDX files,
plain or gzip'd, read directly; fashion_mnist ships with Debian's package dataset-fashion-mnist),
cifar10 / cifar100 (torchvision's files), synthetic (fixed-seed random data with a learnable signal).
Nothing is ever downloaded; `check_data` says where a missing dataset was looked for and how to get it.

Where mnist / fashion_mnist are looked for (`search_roots`): `data.path` only, when given; else, in order,
`DEBIAN_FASHION_MNIST` (fashion_mnist only), $LADLE_DATA, ~/.ladle/data. In each of those folders the IDX
files may lie directly or in torchvision's layout (<root>/MNIST/raw/, <root>/FashionMNIST/raw/, or the
processed training.pt / test.pt of older torchvision in <root>/<Folder>/processed/). cifar10 / cifar100 are
read by torchvision from `data.path`, else $LADLE_DATA, else ~/.ladle/data (`default_root`).

The validation split is `val_fraction` of the training set, stratified by class and drawn with the job's
seed; digits has no test set of its own, so 20% of it is held out the same way. Images keep their stored
dtype (uint8 for 8-bit sources, so CIFAR stays small in every Ray worker) and are normalised per channel
with the training split's mean and std as they leave the split (`TensorSplit.batch`, `TensorSplit.x`).

Augmentation (`DataConfig.augment`, resolved by `default_augment` when not given): the papers' default per
dataset — random crop after padding by min(H, W) // 8 (4 pixels on 32x32) plus a horizontal flip for
cifar10 / cifar100; none for mnist, fashion_mnist, digits, npz, synthetic and imagefolder (Ladle cannot
tell whether a flip keeps the label of a user's images; ask for it with `augment: true`)."""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from workers.files import is_url, local_copy
from workers.config import DATASETS, NEEDS_PATH, AUGMENTED_BY_DEFAULT, DataError, default_augment, DataConfig  # noqa: F401  (torch-free: the driver and the API use them)

TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}                  # read by torchvision
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
IDX_DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}              # name -> torchvision's folder
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")                                           # each plain or with .gz
PROCESSED_FILES = ("training.pt", "test.pt")        # older torchvision's (images, labels) tensors per split
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
MAX_IDX_BYTES = 1 << 31                              # a read cap (decompressed); MNIST's largest file is 47 MB
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")   # Debian's package dataset-fashion-mnist
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """One split in memory: raw `images` (N, C, H, W) as stored (uint8 or float32), labels `y` int64 (N,),
    the source rows `index` int64 (N,) of each example, and the per-channel `mean` / `std` (1, C, 1, 1)
    that normalise the images (computed on the training split, in the images' raw units)."""

    images: Tensor
    y: Tensor
    index: Tensor
    mean: Tensor = field(repr=False)
    std: Tensor = field(repr=False)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: Tensor | slice) -> Tensor:
        """Normalised float32 images at `idx` (indices or a slice)."""
        return (self.images[idx].float() - self.mean) / self.std

    @property
    def x(self) -> Tensor:
        """All images, normalised float32 (materialised on every access; loaders use `batch`)."""
        return self.batch(slice(None))


@dataclass(frozen=True, eq=False)
class Splits:
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    in_shape: tuple[int, int, int]


def default_root() -> Path:
    """Where cifar10 / cifar100 are looked for when `data.path` is not given: $LADLE_DATA, else ~/.ladle/data."""
    return Path(os.environ.get("LADLE_DATA") or home_data_root()).expanduser()


def home_data_root() -> Path:
    """~/.ladle/data, the last place datasets are looked for."""
    return Path.home() / ".ladle" / "data"


def search_roots(name: str, path: str | None) -> list[Path]:
    """The folders searched for the IDX dataset `name`, in order: `path` alone when given; else
    `DEBIAN_FASHION_MNIST` (fashion_mnist only), $LADLE_DATA (when set), ~/.ladle/data."""
    if path:
        return [Path(path).expanduser()]
    roots = [DEBIAN_FASHION_MNIST] if name == "fashion_mnist" else []
    if os.environ.get("LADLE_DATA"):
        roots.append(Path(os.environ["LADLE_DATA"]).expanduser())
    return [*roots, home_data_root()]


@dataclass(frozen=True)
class IdxFiles:
    """Where an IDX dataset was found: the four IDX files (train images, train labels, test images, test
    labels) or, with `processed`, torchvision's (training.pt, test.pt)."""

    folder: Path
    files: tuple[Path, ...]
    processed: bool = False


def _idx_files_in(folder: Path) -> IdxFiles | None:
    """The four IDX files in `folder` (each plain or .gz, plain preferred), else its processed .pt files."""
    found = [next((p for p in (folder / base, folder / f"{base}.gz") if p.is_file()), None) for base in IDX_FILES]
    if all(found):
        return IdxFiles(folder, tuple(found))
    if all((folder / f).is_file() for f in PROCESSED_FILES):
        return IdxFiles(folder, tuple(folder / f for f in PROCESSED_FILES), processed=True)
    return None


def candidate_folders(name: str, root: Path) -> list[Path]:
    """The folders of `root` that may hold the IDX dataset `name`: the root itself, then torchvision's
    <root>/<Folder>/raw and <root>/<Folder>/processed."""
    sub = root / IDX_DATASETS[name]
    return [root, sub / "raw", sub / "processed"]


def find_idx_dataset(name: str, path: str | None) -> IdxFiles | None:
    """The first place (see `search_roots`, `candidate_folders`) that holds the IDX dataset `name`, or None.
    Cheap: it only checks that files exist."""
    for root in search_roots(name, path):
        for folder in candidate_folders(name, root):
            found = _idx_files_in(folder)
            if found is not None:
                return found
    return None


def _describe_root(name: str, root: Path, path: str | None) -> str:
    """A searched root as a user reads it: $LADLE_DATA and ~/.ladle/data spelled as such."""
    if path or (name == "fashion_mnist" and root == DEBIAN_FASHION_MNIST):
        return str(root)
    return "~/.ladle/data" if root == home_data_root() else f"$LADLE_DATA={root}"


def missing_idx_message(name: str, path: str | None) -> str:
    """Why the IDX dataset `name` was not found: the field to change, where it was looked for, which files
    are needed and how to get them."""
    folder = IDX_DATASETS[name]
    roots = ", ".join(_describe_root(name, r, path) for r in search_roots(name, path))
    files = f"its four IDX files ({', '.join(f'{f}.gz' for f in IDX_FILES)}; .gz optional)"
    package = (f"install Debian's package {DEBIAN_FASHION_MNIST_PACKAGE} (apt-get install "
               f"{DEBIAN_FASHION_MNIST_PACKAGE})")
    if path:
        where = (f"data.path: dataset {name!r} not found in {roots} (directly or in {folder}/raw/ or "
                 f"{folder}/processed/)")
        how = (f"that folder needs {files}; or leave data.path out and {package}, which puts them in "
               f"{DEBIAN_FASHION_MNIST}" if name == "fashion_mnist" else
               f"that folder needs {files}; Debian has no MNIST package")
    else:
        where = (f"data.name: dataset {name!r} not found (looked in {roots}, each directly and in {folder}/raw/ "
                 f"or {folder}/processed/)")
        how = (f"{package} or point data.path at a folder with {files}" if name == "fashion_mnist" else
               f"put {files} in ~/.ladle/data (or the folder $LADLE_DATA names), or point data.path at a folder "
               f"that holds them; Debian has no MNIST package")
    return f"{where}: {how}"


def check_data(cfg: DataConfig) -> None:
    """Cheap validation for job specs, naming the bad field: a known dataset, a path that exists (of the
    right kind) where one is needed, the files of mnist / fashion_mnist / cifar10 / cifar100 present
    (existence only, nothing is parsed), val_fraction in [0, 0.5] and a positive batch size."""
    if cfg.name not in DATASETS:
        raise DataError(f"data.name: unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.name in NEEDS_PATH and not cfg.path:
        raise DataError(f"data.path: dataset {cfg.name!r} needs a path")
    if cfg.path and not is_url(cfg.path):       # a URL: an upload (an npz file), read when the job loads it
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"data.path {cfg.path!r} does not exist")
        if cfg.name == "npz" and not path.is_file():
            raise DataError(f"data.path {cfg.path!r} is not a file (npz needs a .npz file)")
        if (cfg.name == "imagefolder" or cfg.name in TORCHVISION or cfg.name in IDX_DATASETS) and not path.is_dir():
            raise DataError(f"data.path {cfg.path!r} is not a directory (dataset {cfg.name!r} needs a folder)")
        if cfg.name == "imagefolder" and (not (path / "train").is_dir() or _eval_dir(path) is None):
            raise DataError(f"data.path {cfg.path!r} needs train/ and test/ (or val/) folders of class folders")
    if cfg.name in IDX_DATASETS and find_idx_dataset(cfg.name, cfg.path) is None:
        raise DataError(missing_idx_message(cfg.name, cfg.path))
    if cfg.name in TORCHVISION:
        root = Path(cfg.path).expanduser() if cfg.path else default_root()
        if not (root / TORCHVISION_FOLDERS[cfg.name]).is_dir():
            raise DataError(missing_torchvision_message(cfg.name, root, "data.path" if cfg.path else "data.name"))
    if not 0.0 <= cfg.val_fraction <= 0.5:
        raise DataError(f"data.val_fraction must be in [0, 0.5], got {cfg.val_fraction}")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise DataError(f"data.batch_size must be a positive integer, got {cfg.batch_size!r}")


def missing_torchvision_message(name: str, root: Path, field_name: str, reason: str = "") -> str:
    """Why cifar10 / cifar100 was not found under `root`, and how to get it (never by downloading here)."""
    cls = TORCHVISION[name]
    return (f"{field_name}: dataset {name} not found under {root}{f' ({reason})' if reason else ''}: put "
            f"torchvision's {TORCHVISION_FOLDERS[name]}/ folder there and point data.path (or $LADLE_DATA) at "
            f"it; Ladle never downloads data (download only where the network allows, e.g. "
            f"torchvision.datasets.{cls}(root, download=True) on another machine)")


# ---------------------------------------------------------------- sources: numpy arrays, x as (N, C, H, W)

@dataclass(frozen=True)
class _Source:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_rows: np.ndarray | None = None     # rows in the original data (default: positions in x_train)
    test_rows: np.ndarray | None = None


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent random stream per (seed, purpose)."""
    return np.random.default_rng([seed % 2**63, stream])


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (kept, held_out), both in random order: round(fraction * len(y)) held out, shared among the
    classes in proportion to their size (largest remainders get the leftover places)."""
    classes, counts = np.unique(y, return_counts=True)
    share = fraction * counts
    take = np.floor(share).astype(np.int64)
    leftover = int(np.floor(fraction * len(y) + 0.5)) - int(take.sum())
    take[np.argsort(take - share, kind="stable")[:leftover]] += 1
    held = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    held_idx = np.concatenate([np.zeros(0, dtype=np.int64), *held])
    kept = np.setdiff1d(np.arange(len(y)), held_idx)
    return rng.permutation(kept), rng.permutation(held_idx)


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, C) with C in (1, 3) and H, W not -> (N, C, H, W); else as is."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x
    raise DataError(f"{what}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {x.shape}")


def _stored_dtype(x: np.ndarray) -> np.ndarray:
    """uint8 stays uint8 (4x smaller); everything else becomes float32."""
    return x if x.dtype == np.uint8 else x.astype(np.float32)


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what}: labels must be a 1-d array with one label per image ({n}); got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)) \
            or not np.all(np.mod(y, 1) == 0) or (len(y) and y.min() < 0):
        raise DataError(f"{what}: labels must be non-negative integers")
    return y.astype(np.int64)


def _digits(seed: int) -> _Source:
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64)
    train, test = _stratified_split(y, DIGITS_TEST_FRACTION, _rng(seed, 0))
    test = np.sort(test)
    return _Source(x[train], y[train], x[test], y[test], train_rows=train, test_rows=test)


def _npz(path: str) -> _Source:
    try:
        with np.load(local_copy(path) if is_url(path) else Path(path).expanduser(), allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"data.path {path!r}: missing arrays {missing} (an npz dataset needs "
                                f"{', '.join(NPZ_KEYS)})")
            arrays = {k: f[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"data.path {path!r}: not a readable .npz file ({e})") from e
    x_tr = _stored_dtype(_to_nchw(arrays["x_train"], f"{path}: x_train"))
    x_te = _stored_dtype(_to_nchw(arrays["x_test"], f"{path}: x_test"))
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"data.path {path!r}: x_train images are {x_tr.shape[1:]} but x_test images are "
                        f"{x_te.shape[1:]}")
    return _Source(x_tr, _labels(arrays["y_train"], len(x_tr), f"{path}: y_train"),
                   x_te, _labels(arrays["y_test"], len(x_te), f"{path}: y_test"))


def _eval_dir(root: Path) -> Path | None:
    return next((root / n for n in ("test", "val") if (root / n).is_dir()), None)


def _image_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    if not files:
        raise DataError(f"data.path: no images found in class folders under {root}")
    return classes, files


def _read_images(files: list[tuple[Path, int]], mode: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    xs = []
    for f, _ in files:
        with Image.open(f) as im:
            xs.append(np.asarray(im.convert(mode), dtype=np.uint8))
    shapes = sorted({x.shape for x in xs})
    if len(shapes) > 1:
        raise DataError(f"data.path: images under {root} differ in size ({', '.join(map(str, shapes[:3]))}"
                        f"{', ...' if len(shapes) > 3 else ''}); resize them to one size first")
    x = np.stack(xs)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.array([c for _, c in files], dtype=np.int64)


def _imagefolder(path: str) -> _Source:
    """Grayscale if every image is, else RGB; all images must have one size."""
    from PIL import Image
    root = Path(path).expanduser()
    test_dir = _eval_dir(root)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"data.path {path!r} needs train/ and test/ (or val/) folders of class folders")
    classes, train_files = _image_files(root / "train")
    test_classes, test_files = _image_files(test_dir)
    if test_classes != classes:
        raise DataError(f"data.path {path!r}: train/ has classes {classes} but {test_dir.name}/ has {test_classes}")
    modes = set()
    for f, _ in train_files + test_files:
        with Image.open(f) as im:
            modes.add(im.mode)
    mode = "L" if modes <= {"L", "1"} else "RGB"
    x_tr, y_tr = _read_images(train_files, mode, root)
    x_te, y_te = _read_images(test_files, mode, root)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"data.path: images under {root} differ in size ({x_tr.shape[2:]} in train/, "
                        f"{x_te.shape[2:]} in {test_dir.name}/)")
    return _Source(x_tr, y_tr, x_te, y_te)


def _torchvision(name: str, path: str | None) -> _Source:
    """cifar10 / cifar100 through torchvision's reader, from `data.path` or `default_root()`; no download."""
    import torchvision
    root = Path(path).expanduser() if path else default_root()
    cls = getattr(torchvision.datasets, TORCHVISION[name])
    try:
        train, test = (cls(str(root), train=flag, download=False) for flag in (True, False))
    except RuntimeError as e:
        raise DataError(missing_torchvision_message(name, root, "data.path" if path else "data.name", str(e))) from e

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        x = _to_nchw(np.asarray(ds.data), f"{name} under {root}")
        return x, _labels(np.asarray(ds.targets), len(x), f"{name} under {root}")
    return _Source(*arrays(train), *arrays(test))


def _file_bytes(path: Path, limit: int = MAX_IDX_BYTES) -> bytes:
    """The contents of `path`, gunzipped when it starts with gzip's magic bytes; at most `limit` bytes."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            raw = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) > limit:
        raise DataError(f"{path}: larger than {limit} bytes{' unpacked' if gzipped else ''}; not an IDX file of "
                        f"a dataset Ladle reads")
    return raw


def parse_idx(raw: bytes, what: str) -> np.ndarray:
    """An IDX array from its bytes: a magic number (two zero bytes, a dtype code, the number of
    dimensions), one big-endian uint32 per dimension, then the values, big-endian, in C order.
    Returned in native byte order (a writable copy); `what` names the source in errors."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{what}: not an IDX file (magic number 0x{raw[:4].hex() or 'none'}; expected "
                        f"0x0000TTDD with type TT in {', '.join(f'{t:02x}' for t in IDX_DTYPES)} and DD >= 1 "
                        f"dimensions)")
    ndim, dtype = raw[3], IDX_DTYPES[raw[2]]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{what}: IDX header cut short ({len(raw)} bytes; {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(f"{what}: IDX header says {' x '.join(map(str, dims))} values of {dtype.itemsize} "
                        f"byte(s) ({count * dtype.itemsize} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (plain or gzip'd, told apart by its first bytes) as a numpy array; see `parse_idx`."""
    return parse_idx(_file_bytes(Path(path)), str(path))


def _read_processed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Older torchvision's processed split: a torch-saved (images uint8 (N, H, W), labels int64 (N,)) pair."""
    try:
        pair = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a torchvision processed file ({e})") from e
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
        raise DataError(f"{path}: not a torchvision processed file (expected an (images, labels) pair of tensors)")
    return pair[0].numpy(), pair[1].numpy()


def _idx_source(name: str, path: str | None) -> _Source:
    """mnist / fashion_mnist from the first place `find_idx_dataset` finds."""
    found = find_idx_dataset(name, path)
    if found is None:
        raise DataError(missing_idx_message(name, path))
    if found.processed:
        (x_tr, y_tr), (x_te, y_te) = (_read_processed(f) for f in found.files)
        origin = [str(f) for f in found.files for _ in ("images", "labels")]
    else:
        x_tr, y_tr, x_te, y_te = (read_idx(f) for f in found.files)
        origin = [str(f) for f in found.files]        # the file of x_train, y_train, x_test, y_test
    x_tr, x_te = _stored_dtype(_to_nchw(x_tr, origin[0])), _stored_dtype(_to_nchw(x_te, origin[2]))
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{found.folder}: training images are {x_tr.shape[1:]} but test images are {x_te.shape[1:]}")
    return _Source(x_tr, _labels(y_tr, len(x_tr), origin[1]), x_te, _labels(y_te, len(x_te), origin[3]))


def _synthetic(seed: int = 1234, n_train: int = 2000, n_test: int = 500, classes: int = 10,
               shape: tuple[int, int, int] = (1, 8, 8)) -> _Source:
    """Gaussian classes around fixed random means: a learnable signal, well above chance but not trivial."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (classes, *shape))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        return (means[y] + rng.normal(0, 1.5, (n, *shape))).astype(np.float32), y.astype(np.int64)
    return _Source(*draw(n_train), *draw(n_test))


def _load_source(name: str, path: str | None, seed: int) -> _Source:
    if name == "digits":
        return _digits(seed)
    if name == "npz":
        return _npz(path)
    if name == "imagefolder":
        return _imagefolder(path)
    if name == "synthetic":
        return _synthetic()
    if name in IDX_DATASETS:
        return _idx_source(name, path)
    return _torchvision(name, path)


# ---------------------------------------------------------------- splits

def _channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of (N, C, H, W) images in float64, a chunk at a time (no full float copy)."""
    total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].astype(np.float64)
        total += part.sum(axis=(0, 2, 3))
        squares += np.square(part).sum(axis=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))
    return mean, np.where(std > 1e-6 * np.maximum(np.abs(mean), 1.0), std, 1.0)  # constant channel: no scaling


@functools.lru_cache(maxsize=8)
def _cached_splits(name: str, path: str | None, val_fraction: float, seed: int) -> Splits:
    src = _load_source(name, path, seed)
    train_rows = src.train_rows if src.train_rows is not None else np.arange(len(src.y_train))
    test_rows = src.test_rows if src.test_rows is not None else np.arange(len(src.y_test))
    keep, val = _stratified_split(src.y_train, val_fraction, _rng(seed, 1))
    if len(keep) == 0:
        raise DataError(f"data: dataset {name!r} has no training examples")
    x_train = src.x_train[keep]
    mean, std = (torch.from_numpy(s.astype(np.float32)).view(1, -1, 1, 1) for s in _channel_stats(x_train))

    def split(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> TensorSplit:
        return TensorSplit(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),
                           torch.from_numpy(rows.astype(np.int64)), mean, std)
    labels = np.concatenate([src.y_train, src.y_test])
    return Splits(train=split(x_train, src.y_train[keep], train_rows[keep]),
                  val=split(src.x_train[val], src.y_train[val], train_rows[val]),
                  test=split(src.x_test, src.y_test, test_rows),
                  num_classes=int(labels.max()) + 1, in_shape=tuple(int(s) for s in x_train.shape[1:]))


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Train / val / test splits for `cfg`; which examples land where (and the fixed order of the training
    split) depends on `seed`. Cached per process on (name, path, val_fraction, seed), with mnist /
    fashion_mnist keyed by the folder they were found in: repeated calls return the same tensors, which
    callers must not modify in place."""
    check_data(cfg)
    path = cfg.path
    if cfg.name in IDX_DATASETS:
        path = str(find_idx_dataset(cfg.name, cfg.path).folder)     # found: check_data looked
    return _cached_splits(cfg.name, path, float(cfg.val_fraction), int(seed))


load_splits.cache_clear = _cached_splits.cache_clear  # type: ignore[attr-defined]


# ---------------------------------------------------------------- loader

def _translate(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift every image by a random offset in [-pad, pad]^2, pad = max(1, min(H, W) // 8), filling with 0
    (the channel mean, since `x` is normalised): pad-and-random-crop in one gather."""
    n, c, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def _flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class TensorLoader:
    """Batches of (normalised x, y) over an in-memory split, on the CPU; re-iterable, `len` = batches.

    shuffle=True draws a new permutation on every pass from a generator seeded by `seed`, so two loaders
    with the same seed give the same batches pass after pass; shuffle=False keeps the split's fixed order.
    augment=True shifts each image randomly (pad by size // 8, random crop) and flips 3-channel images
    left-right with probability 1/2, driven by the same generator.
    """

    def __init__(self, split: TensorSplit, batch_size: int, *, shuffle: bool, seed: int = 0,
                 augment: bool = False, drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.augment, self.drop_last = augment, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.split), generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            start, stop = b * self.batch_size, (b + 1) * self.batch_size
            idx = order[start:stop] if order is not None else slice(start, stop)
            x = self.split.batch(idx)
            if self.augment:
                x = _translate(x, self.generator)
                if x.shape[1] == 3:
                    x = _flip(x, self.generator)
            yield x, self.split.y[idx]


def make_loader(split: TensorSplit, batch_size: int, *, shuffle: bool, seed: int = 0, augment: bool = False,
                drop_last: bool = False) -> TensorLoader:
    """A `TensorLoader` over `split` (see there)."""
    return TensorLoader(split, batch_size, shuffle=shuffle, seed=seed, augment=augment, drop_last=drop_last)
