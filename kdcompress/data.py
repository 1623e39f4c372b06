"""Data sets as tasks: train / val / test splits plus what every stage needs to know about them.

A :class:`Task` flows into every stage that asks for ``data``. Built-in tasks: :func:`digits`
(scikit-learn's bundled 8x8 digits, the embedded default, no download) and :func:`mnist` (the four
standard IDX files from a local folder, never downloaded). :func:`from_tensors` and
:func:`from_datasets` wrap the user's own data.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdcompress.errors import DataError

__all__ = ["Task", "digits", "mnist", "from_tensors", "from_datasets", "get", "limit_train"]

DATA_ENV = "KDCOMPRESS_DATA"


@dataclass(frozen=True, eq=False)
class Task:
    """A classification task: its splits, its shapes and a fingerprint of its contents.

    Parameters
    ----------
    name : str
        Short name shown in reports (``"digits"``, ``"mnist"``).
    train, val, test : Dataset
        Map-style data sets yielding ``(input, label)`` pairs; ``val`` may be ``None``.
    num_classes : int
        Number of classes; labels are ``0 .. num_classes - 1``.
    input_shape : tuple of int
        Shape of one input, without the batch axis, e.g. ``(1, 8, 8)``.
    fingerprint : str
        Hash of the contents; a stage is re-run when the data's fingerprint changes.
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def loader(
        self, split: str = "train", *, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """Return a DataLoader over one split; shuffling is seeded so runs repeat exactly."""
        dataset = self.split(split)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=drop_last)

    @property
    def eval_split(self) -> str:
        """The split training stages score themselves on: ``"val"``, or ``"train"`` without one."""
        return "val" if self.val is not None else "train"

    def split(self, split: str) -> Dataset:
        """Return the data set of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown split '{split}': use 'train', 'val' or 'test'")
        dataset = getattr(self, split)
        if dataset is None:
            raise DataError(f"task '{self.name}' has no '{split}' split")
        return dataset

    def arrays(self, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Return one split as two tensors ``(inputs, labels)``, cached after the first call."""
        if split not in self._cache:
            dataset = self.split(split)
            if isinstance(dataset, TensorDataset):
                x, y = dataset.tensors[0], dataset.tensors[1]
            else:  # a user's data set, read for the first time: check what it yields
                x, y = _stack(dataset, split)
                if tuple(x.shape[1:]) != self.input_shape:
                    raise DataError(f"the {split} split: samples have shape {tuple(x.shape[1:])} "
                                    f"but task '{self.name}' has input_shape {self.input_shape}")
                _check_range(f"the {split} split", y, self.num_classes)
            self._cache[split] = (x.float(), y.long())
        return self._cache[split]

    def calibration(self, n: int = 256, *, seed: int = 0) -> torch.Tensor:
        """Return ``n`` training inputs drawn with a fixed seed (int8 calibration, tracing)."""
        x, _ = self.arrays("train")
        n = min(n, len(x))
        index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x[index]

    def example(self, batch_size: int = 1) -> torch.Tensor:
        """Return the first ``batch_size`` training inputs (for export and tracing)."""
        x, _ = self.arrays("train")
        return x[:batch_size]


def _stack(dataset: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every sample of a user's data set into ``(inputs, labels)``, checking each one."""
    n = _length(dataset, split)
    if n == 0:
        raise DataError(f"the {split} split is empty (its data set has 0 samples): give it at "
                        "least one sample")
    xs, ys = [], []
    for i in range(n):
        x, y = _sample(dataset, split, i)
        if i and x.shape != xs[0].shape:
            raise DataError(f"the {split} split: sample {i} has shape {tuple(x.shape)} but sample "
                            f"0 has shape {tuple(xs[0].shape)}; every input must have one shape "
                            "(resize or pad them in the data set)")
        xs.append(x)
        ys.append(y)
    x = torch.stack(xs)
    _check_finite(f"the {split} split", x)
    return x, torch.stack(ys)


def _length(dataset: Dataset, split: str) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError(f"the {split} split: {type(dataset).__name__} has no len(); give a "
                        "map-style data set (with __len__ and __getitem__)") from exc


def _sample(dataset: Dataset, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``i`` of a user's data set as ``(input, label)`` tensors, or a DataError naming it."""
    where = f"the {split} split: sample {i}"
    try:
        item = dataset[i]
    except Exception as exc:  # the user's own code: say which sample it failed on
        raise DataError(f"the {split} split: reading sample {i} raised {type(exc).__name__}: "
                        f"{exc}") from exc
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{where} is a {type(item).__name__}, but a data set must yield "
                        "(input, label) pairs")
    try:
        x = torch.as_tensor(item[0])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where}'s input of type {type(item[0]).__name__} cannot be made a "
                        "tensor: give tensors or numeric arrays (e.g. with a transform such as "
                        "torchvision.transforms.ToTensor())") from exc
    if x.ndim == 0 or x.is_complex():
        what = "a scalar" if x.ndim == 0 else f"of dtype {x.dtype}"
        raise DataError(f"{where}'s input is {what}; each input must be a real tensor with at "
                        "least one axis, e.g. shape (features,)")
    try:
        y = torch.as_tensor(item[1])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where}'s label of type {type(item[1]).__name__} cannot be made a "
                        "tensor: labels must be integer class indices") from exc
    if y.ndim != 0:
        raise DataError(f"{where}'s label has shape {tuple(y.shape)}; each label must be a single "
                        "integer class index")
    if not _is_integer(y):
        raise DataError(f"{where}'s label {y.item()} is {y.dtype}; labels must be integer class "
                        "indices (convert them with int(label))")
    return x, y


def _hash_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _first(mask: torch.Tensor) -> int:
    """Index of the first ``True`` in a 1-D mask that has one."""
    return int(mask.nonzero()[0, 0])


def _check_finite(where: str, x: torch.Tensor) -> None:
    """Refuse NaN or inf in float32 inputs (float64 values beyond its range become inf)."""
    if not (x.is_floating_point() or x.is_complex()):
        return  # integer inputs are finite
    x = x.float()
    if bool(torch.isfinite(x.sum())):  # one pass, no copy: NaN and inf make the sum non-finite
        return
    bad = ~torch.isfinite(x).reshape(len(x), -1).all(dim=1)  # or the sum merely overflowed
    if bool(bad.any()):
        raise DataError(f"{where}: sample {_first(bad)} holds NaN or inf (inputs must be finite "
                        "float32 values): repair or drop that sample")


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise DataError(f"num_classes must be an integer >= 2, but got {num_classes!r}")
    return int(num_classes)


def _check_range(where: str, y: torch.Tensor, num_classes: int) -> None:
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        i = _first(bad)
        raise DataError(f"{where} holds label {int(y[i])} at sample {i}, outside "
                        f"0..{num_classes - 1} (num_classes={num_classes})")


def _check_two_classes(where: str, y: torch.Tensor) -> torch.Tensor:
    """Return the classes present in training labels ``y``: at least two, or a DataError."""
    present = torch.unique(y)
    if len(present) < 2:
        raise DataError(f"{where} holds only class {int(present[0])} ({len(y)} samples); a "
                        "classifier needs at least two classes to learn from")
    return present


def _check_classes(name: str, labels: dict[str, torch.Tensor], num_classes: object) -> int:
    """Check the labels of every split (keys ``"train"``, ``"val"``, ``"test"``) and return the
    number of classes: ``num_classes`` when given, else inferred as the largest label + 1,
    which every class below must then occur in the training split to justify."""
    for split, y in labels.items():
        negative = y < 0
        if bool(negative.any()):
            i = _first(negative)
            raise DataError(f"{name}: the {split} split holds label {int(y[i])} at sample {i}; "
                            "labels are class indices 0..num_classes-1")
    present = _check_two_classes(f"{name}: the training split", labels["train"])
    if num_classes is not None:
        classes = _check_num_classes(num_classes)
        for split, y in labels.items():
            _check_range(f"{name}: the {split} split", y, classes)
        return classes
    split, y = max(labels.items(), key=lambda item: int(item[1].max()))
    classes = int(y.max()) + 1
    have = set(present.tolist())
    missing = [c for c in range(min(classes, len(have) + 11)) if c not in have][:10]
    if missing:
        count = classes - len(have)
        shown = str(missing) if count <= 10 else f"{str(missing)[:-1]}, ... ({count} in all)]"
        raise DataError(f"{name}: num_classes is inferred as {classes} from the largest label "
                        f"({classes - 1}, in the {split} split at sample {_first(y == classes - 1)}"
                        f"), but classes {shown} never occur in the training split; pass "
                        f"num_classes={classes} explicitly if that is intended, or number the "
                        f"classes 0..{len(have) - 1}")
    return classes


def _check_inputs(name: str, key: str, x: torch.Tensor) -> None:
    """Shape and dtype of one split's input tensor ``x_<split>`` of :func:`from_tensors`."""
    if x.ndim == 0 or (x.ndim == 1 and len(x)):
        fix = "; for one feature per sample use x.unsqueeze(1)" if x.ndim == 1 else ""
        raise DataError(f"{name}: {key} must have shape (samples, ...) with at least one axis per "
                        f"sample, but got shape {tuple(x.shape)}{fix}")
    if len(x) == 0:
        split = key[2:]
        fix = f", or leave {key}=None for no {split} split" if split == "val" else ""
        raise DataError(f"{name}: the {split} split is empty ({key} has 0 samples): give it at "
                        f"least one sample{fix}")
    if x.is_complex():
        raise DataError(f"{name}: {key} has dtype {x.dtype}; inputs must be real numbers")


def _check_label_tensor(name: str, key: str, y: torch.Tensor) -> None:
    if y.ndim != 1:
        raise DataError(f"{name}: {key} must be a 1-D tensor of class indices, but got shape "
                        f"{tuple(y.shape)}")
    if not _is_integer(y):
        raise DataError(f"{name}: {key} holds {y.dtype} values: labels must be integer class "
                        f"indices (convert whole-number labels with {key}.long())")


def _as_tensor(name: str, key: str, value: object) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name}: {key} of type {type(value).__name__} cannot be made a tensor: "
                        "give a torch.Tensor or a numeric numpy array") from exc


def from_tensors(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
    x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
    num_classes: int | None = None, name: str = "tensors",
) -> Task:
    """Build a task from tensors (or numpy arrays) of inputs and integer labels.

    Without ``num_classes`` the count is inferred as the largest label + 1, and every class
    ``0 .. num_classes - 1`` must then occur in ``y_train``.

    Raises
    ------
    DataError
        A split is empty; inputs have fewer than two dimensions or differ in sample shape
        between splits; labels are not 1-D integer class indices in ``0..num_classes-1``; the
        training split has a single class; or an input holds NaN or inf. The message names the
        split, and the sample where there is one.

    Examples
    --------
    >>> import torch
    >>> task = from_tensors(torch.randn(8, 3), torch.arange(8) % 2, torch.randn(4, 3),
    ...                     torch.arange(4) % 2)
    >>> task.input_shape, task.num_classes
    ((3,), 2)
    """
    parts = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
             "x_val": x_val, "y_val": y_val}
    t = {k: None if v is None else _as_tensor(name, k, v) for k, v in parts.items()}
    for split in ("train", "test", "val"):
        x, y = t[f"x_{split}"], t[f"y_{split}"]
        if (x is None) != (y is None) or (x is None and split != "val"):
            need = "are required" if split != "val" else "go together"
            raise DataError(f"give both x_{split} and y_{split}, or neither: they {need}")
        if x is None:
            continue
        _check_label_tensor(name, f"y_{split}", y)
        _check_inputs(name, f"x_{split}", x)
        if len(x) != len(y):
            raise DataError(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
    _check_shapes(name, {k: v for k, v in t.items() if k.startswith("x") and v is not None})
    labels = {s: t[f"y_{s}"] for s in ("train", "val", "test") if t[f"y_{s}"] is not None}
    classes = _check_classes(name, labels, num_classes)
    ds = {s: None if t[f"x_{s}"] is None else
          TensorDataset(t[f"x_{s}"].float(), t[f"y_{s}"].long()) for s in ("train", "val", "test")}
    for s, d in ds.items():
        if d is not None:
            _check_finite(f"{name}: x_{s}", d.tensors[0])
    tensors = [v.float() if k.startswith("x") else v.long() for k, v in t.items() if v is not None]
    return Task(name=name, train=ds["train"], val=ds["val"], test=ds["test"], num_classes=classes,
                input_shape=tuple(t["x_train"].shape[1:]), fingerprint=_hash_tensors(*tensors))


def _check_shapes(name: str, inputs: dict[str, torch.Tensor]) -> None:
    """Every split's samples have the shape of ``x_train``'s."""
    shape = tuple(inputs["x_train"].shape[1:])
    for key, x in inputs.items():
        if tuple(x.shape[1:]) != shape:
            raise DataError(f"{name}: x_train samples have shape {shape} but {key} samples have "
                            f"shape {tuple(x.shape[1:])}; every split must hold inputs of one "
                            "shape")


def from_datasets(
    train: Dataset, test: Dataset, *, val: Dataset | None = None, num_classes: int | None = None,
    name: str = "datasets", fingerprint: str | None = None,
) -> Task:
    """Build a task from map-style datasets yielding ``(input_tensor, label)``.

    The fingerprint hashes every sample unless one is given (pass your own for large data).
    Without a fingerprint every sample is read and checked here; with one, only the first and
    last sample of each split are read now, and a split's samples are checked when it is first
    read whole (:meth:`Task.arrays`).

    Raises
    ------
    DataError
        A split is empty, a sample is not an ``(input, label)`` pair, inputs differ in shape
        between or within splits, a label is not an integer class index in ``0..num_classes-1``,
        or an input holds NaN or inf. The message names the split and the sample.
    """
    splits = {"train": train, "val": val, "test": test}
    sizes = {}
    for split, dataset in splits.items():
        if dataset is None:
            if split != "val":
                raise DataError(f"from_datasets: the {split} split is required, but got None")
            continue
        sizes[split] = _length(dataset, split)
        if sizes[split] == 0:
            raise DataError(f"{name}: the {split} split is empty (its data set has 0 samples): "
                            "give it at least one sample")
    x0, _ = _sample(train, "train", 0)
    for split, n in sizes.items():  # cheap: the first and the last sample of each split
        for i in sorted({0, n - 1}):
            x, _ = _sample(splits[split], split, i)
            if x.shape != x0.shape:
                raise DataError(f"{name}: the {split} split: sample {i} has shape "
                                f"{tuple(x.shape)} but train sample 0 has shape "
                                f"{tuple(x0.shape)}; every input must have one shape")
    if fingerprint is None:
        parts = {s: _stack(d, s) for s, d in splits.items() if d is not None}
        fingerprint = _hash_tensors(*[t for pair in parts.values() for t in pair])
        num_classes = _check_classes(name, {s: y for s, (_, y) in parts.items()}, num_classes)
    elif num_classes is None:
        raise DataError("from_datasets: give num_classes when you give your own fingerprint")
    else:
        num_classes = _check_num_classes(num_classes)
    return Task(name=name, train=train, val=val, test=test, num_classes=num_classes,
                input_shape=tuple(x0.shape), fingerprint=fingerprint)


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


def limit_train(task: Task, n: int) -> Task:
    """``task`` with only its first ``n`` training samples (quick runs on large data sets).

    The validation and test splits are unchanged, so accuracies stay comparable; the name becomes
    ``"<name>-<n>"`` and the fingerprint changes with ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise DataError(f"a training limit must be an integer, but got {n!r}")
    if n < 1:
        raise DataError(f"a training limit must be >= 1, but got {n}")
    train = task.train
    if isinstance(train, TensorDataset):
        train = TensorDataset(*(t[:n] for t in train.tensors))
        if len(torch.unique(train.tensors[1])) < 2:
            raise DataError(f"limit_train: the first {n} training samples of '{task.name}' hold "
                            f"only class {int(train.tensors[1][0])}; a classifier needs at least "
                            "two classes: use a larger limit")
    else:
        train = subset(train, n)
    fingerprint = hashlib.sha256(f"{task.fingerprint}:{n}".encode()).hexdigest()[:16]
    return Task(name=f"{task.name}-{n}", train=train, val=task.val, test=task.test,
                num_classes=task.num_classes, input_shape=task.input_shape,
                fingerprint=fingerprint)


def get(spec: str) -> Task:
    """Build a built-in task from a command-line spec: ``digits`` or ``mnist[:DIR]``."""
    name, _, root = spec.partition(":")
    if name == "digits":
        if root:
            raise DataError("'digits' is bundled with scikit-learn and takes no folder")
        return digits()
    if name == "mnist":
        return mnist(root or None)
    raise DataError(f"unknown data set '{name}': use 'digits' or 'mnist:DIR'")


def subset(dataset: Dataset, n: int) -> Dataset:
    """The first ``n`` samples of a data set."""
    return Subset(dataset, range(min(n, len(dataset))))  # type: ignore[arg-type]
