"""The built-in tasks: scikit-learn's digits and MNIST from its IDX files."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdcompress.data._checks import _check_range, _check_two_classes
from kdcompress.data._memory import from_tensors
from kdcompress.data._task import Task
from kdcompress.errors import DataError

DATA_ENV = "KDCOMPRESS_DATA"


def digits(*, test_size: float = 0.2, val_size: float = 0.1, seed: int = 0) -> Task:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), no download.

    Stratified split with a fixed seed; pixels scaled to [0, 1] then standardised with the
    training mean and standard deviation. Inputs have shape ``(1, 8, 8)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test_idx = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    train_idx, val_idx = train_test_split(rest, test_size=val_size / (1 - test_size),
                                          stratify=y[rest], random_state=seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = torch.from_numpy((x - mean) / std).unsqueeze(1)
    y = torch.from_numpy(y)
    task = from_tensors(x[train_idx], y[train_idx], x[test_idx], y[test_idx],
                        x_val=x[val_idx], y_val=y[val_idx], num_classes=10, name="digits")
    return task


_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32",
              0x0D: "float32", 0x0E: "float64"}
_GZIP_MAGIC = b"\x1f\x8b"
_DEFLATE_MAX_RATIO = 1032  # deflate expands its input at most ~1032-fold
_CHUNK = 1 << 24


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one unsigned-byte IDX file, gzipped or not (told by its content), into a numpy array.

    The header is checked against the file's size before the data is read, so a corrupt header
    never leads to a huge allocation.

    Raises
    ------
    DataError
        The file cannot be opened, is not an unsigned-byte IDX file (bad magic number), is
        truncated or longer than its header says, or is a damaged gzip file; the message names
        the file and the fault.

    Examples
    --------
    >>> read_idx("train-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
    (60000,)
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            gzipped = f.read(2) == _GZIP_MAGIC
            f.seek(0)
            if not gzipped:
                return _parse_idx(path, f, size=size, gzipped=False)
            with gzip.GzipFile(fileobj=f, mode="rb") as unzipped:
                return _parse_idx(path, unzipped, size=size, gzipped=True)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a damaged or truncated gzip file ({exc}): download it "
                        "again") from exc
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc


def _parse_idx(path: Path, f: BinaryIO, *, size: int, gzipped: bool) -> np.ndarray:
    """Parse an IDX stream from a file of ``size`` bytes: the header first, then its data."""
    magic = f.read(4)
    if len(magic) < 4:
        raise DataError(f"{path} is not an IDX file (bad magic number: the file holds only "
                        f"{len(magic)} bytes)")
    if magic[:2] != b"\0\0":
        raise DataError(f"{path} is not an IDX file (bad magic number {magic.hex(' ')}; an IDX "
                        "file starts with 00 00 08 <dimensions>)")
    if magic[2] != 0x08:
        kind = _IDX_TYPES.get(magic[2], "unknown")
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number: type "
                        f"0x{magic[2]:02x}, {kind}); only type 0x08 is read")
    ndim = magic[3]
    if ndim == 0:
        raise DataError(f"{path} is malformed: its header declares 0 dimensions")
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path} is truncated: its header declares {ndim} dimensions but the "
                        f"file ends after {4 + len(raw_dims)} bytes")
    dims = list(struct.unpack(f">{ndim}I", raw_dims))
    expected = math.prod(dims)  # Python ints: no overflow
    said = f"{path} is truncated or corrupt: header says {dims} ({expected} bytes)"
    if gzipped and expected > size * _DEFLATE_MAX_RATIO:  # refused before reading
        raise DataError(f"{said} but a gzip file of {size} bytes cannot hold that much")
    if not gzipped and expected > size - 4 - 4 * ndim:
        raise DataError(f"{said} but the file holds {size - 4 - 4 * ndim}")
    body = bytearray()
    while len(body) <= expected:
        chunk = f.read(min(_CHUNK, expected + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) != expected:
        held = "more" if len(body) > expected else len(body)
        raise DataError(f"{said} but the file holds {held}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "mnist", root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                     stem.replace("-idx", ".idx") + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"MNIST file '{stem}' (or '{stem}.gz') not found in {root}: put the four "
                    "standard IDX files there (kdcompress never downloads data)")


def mnist(root: str | os.PathLike | None = None, *, val_size: int = 5000,
          train_limit: int | None = None) -> Task:
    """MNIST from the four standard IDX files in ``root`` (gzipped or not); never downloaded.

    Parameters
    ----------
    root : path, optional
        Folder holding the files (or a ``mnist/`` folder inside it). Defaults to the
        ``KDCOMPRESS_DATA`` environment variable.
    val_size : int
        The last ``val_size`` training images become the validation split.
    train_limit : int, optional
        Keep only the first ``train_limit`` training images (quick experiments).

    Raises
    ------
    DataError
        A file is missing, unreadable, truncated or corrupt (see :func:`read_idx`); images are
        not 3-D or labels not 1-D; image and label counts differ; a split is empty; a label is
        outside 0..9; or training and test images differ in size. The message names the file.
    """
    root = root or os.environ.get(DATA_ENV)
    if not root:
        raise DataError(f"mnist needs a folder: pass mnist(root=...), use --data mnist:DIR, or "
                        f"set {DATA_ENV}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist")
    if train_limit is not None and train_limit < 1:
        raise DataError(f"mnist: train_limit must be >= 1, but got {train_limit}")
    paths = {k: _find_idx(root, stem) for k, stem in _MNIST_FILES.items()}
    arrays = {k: read_idx(path) for k, path in paths.items()}
    _check_mnist(arrays, paths)
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(arrays[k].tobytes())
    h.update(f"{val_size},{train_limit}".encode())

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
        return ((x - _MNIST_MEAN) / _MNIST_STD).unsqueeze(1)

    x_train = images(arrays["x_train"])
    y_train = torch.from_numpy(arrays["y_train"].astype(np.int64))
    if not 0 <= val_size < len(x_train):
        raise DataError(f"mnist: val_size must be >= 0 and below the {len(x_train)} training "
                        f"images in {root}, but got {val_size}")
    n_train = len(x_train) - val_size
    x_val, y_val = x_train[n_train:], y_train[n_train:]
    x_train, y_train = x_train[:n_train], y_train[:n_train]
    if train_limit is not None:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    _check_two_classes(f"mnist: the training split ({paths['y_train']})", y_train)
    x_test = images(arrays["x_test"])
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    # the inputs come from unsigned bytes, so they are finite: no NaN/inf scan is needed here
    return Task(name="mnist", train=TensorDataset(x_train, y_train),
                val=TensorDataset(x_val, y_val) if val_size else None,
                test=TensorDataset(x_test, y_test),
                num_classes=10, input_shape=tuple(x_train.shape[1:]),
                fingerprint=h.hexdigest()[:16])


def _check_mnist(arrays: dict[str, np.ndarray], paths: dict[str, Path]) -> None:
    """The four MNIST arrays: images (N, H, W), labels (N,) in 0..9, one image size."""
    for key, a in arrays.items():
        want = (3, "3 dimensions (images, rows, columns)") if key[0] == "x" else \
            (1, "1 dimension (labels)")
        if a.ndim != want[0]:
            kind = "images" if key[0] == "x" else "labels"
            raise DataError(f"{paths[key]} holds an array of shape {a.shape}, but MNIST {kind} "
                            f"need {want[1]}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(f"MNIST {split}: {len(x)} images but {len(y)} labels "
                            f"({paths[f'x_{split}']} and {paths[f'y_{split}']}); the files are "
                            "from different downloads, or one is damaged")
        if len(x) == 0:
            raise DataError(f"MNIST: the {split} split is empty: {paths[f'x_{split}']} holds 0 "
                            "images")
        _check_range(f"the {split} split ({paths[f'y_{split}']})", torch.from_numpy(y), 10)
    train, test = arrays["x_train"].shape[1:], arrays["x_test"].shape[1:]
    if train != test:
        raise DataError(f"MNIST: training images are {train[0]}x{train[1]} "
                        f"({paths['x_train']}) but test images are {test[0]}x{test[1]} "
                        f"({paths['x_test']}); both must have one size")


def get(spec: str) -> Task:
    """Build a task from a command-line spec: ``digits``, ``mnist[:DIR]``, ``folder:DIR`` (an
    image folder, :func:`~kdcompress.data.from_folder` with its defaults) or ``npz:FILE``
    (:func:`~kdcompress.data.from_numpy`)."""
    from kdcompress.data._folder import from_folder
    from kdcompress.data._npz import from_numpy

    name, _, root = spec.partition(":")
    if name == "digits":
        if root:
            raise DataError("'digits' is bundled with scikit-learn and takes no folder")
        return digits()
    if name == "mnist":
        return mnist(root or None)
    if name in ("folder", "npz"):
        if not root:
            what = "DIR" if name == "folder" else "FILE"
            raise DataError(f"'{name}' needs a path: {name}:{what}")
        return from_folder(root) if name == "folder" else from_numpy(root)
    raise DataError(f"unknown data set '{name}': use 'digits', 'mnist:DIR', 'folder:DIR' or "
                    "'npz:FILE'")


