"""Data sets as tasks: train / val / test splits plus what every stage needs to know about them.

A :class:`Task` flows into every stage that asks for ``data``. Built-in tasks: :func:`digits`
(scikit-learn's bundled 8x8 digits, the embedded default, no download) and :func:`mnist` (the four
standard IDX files from a local folder, never downloaded). :func:`from_tensors` and
:func:`from_datasets` wrap the user's own data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

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
            else:
                x, y = _stack(dataset)
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


def _stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        x, y = dataset[i]
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataError("data set is empty")
    return torch.stack(xs), torch.stack(ys)


def _hash_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _check_labels(name: str, y: torch.Tensor, num_classes: int | None) -> int:
    if y.ndim != 1:
        raise DataError(f"{name}: labels must be a 1-D tensor of class indices, but got shape "
                        f"{tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{name}: labels must be >= 0, but got {int(y.min())}")
    found = int(y.max()) + 1 if y.numel() else 0
    if num_classes is None:
        return found
    if found > num_classes:
        raise DataError(f"{name}: num_classes={num_classes} but a label is {found - 1}")
    return num_classes


def from_tensors(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
    x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
    num_classes: int | None = None, name: str = "tensors",
) -> Task:
    """Build a task from tensors (or numpy arrays) of inputs and integer labels.

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
    t = {k: None if v is None else torch.as_tensor(v) for k, v in parts.items()}
    for split in ("train", "test", "val"):
        x, y = t[f"x_{split}"], t[f"y_{split}"]
        if (x is None) != (y is None):
            raise DataError(f"give both x_{split} and y_{split}, or neither")
        if x is not None and len(x) != len(y):
            raise DataError(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if y is not None and y.ndim != 1:
            raise DataError(f"{name}: y_{split} must be a 1-D tensor of class indices, but got "
                            f"shape {tuple(y.shape)}")
    if t["x_train"].shape[1:] != t["x_test"].shape[1:]:
        raise DataError(f"x_train samples have shape {tuple(t['x_train'].shape[1:])} but x_test "
                        f"samples have shape {tuple(t['x_test'].shape[1:])}")
    all_y = torch.cat([t["y_train"].long(), t["y_test"].long()]
                      + ([t["y_val"].long()] if t["y_val"] is not None else []))
    classes = _check_labels(name, all_y, num_classes)
    ds = {s: None if t[f"x_{s}"] is None else
          TensorDataset(t[f"x_{s}"].float(), t[f"y_{s}"].long()) for s in ("train", "val", "test")}
    tensors = [v.float() if k.startswith("x") else v.long() for k, v in t.items() if v is not None]
    return Task(name=name, train=ds["train"], val=ds["val"], test=ds["test"], num_classes=classes,
                input_shape=tuple(t["x_train"].shape[1:]), fingerprint=_hash_tensors(*tensors))


def from_datasets(
    train: Dataset, test: Dataset, *, val: Dataset | None = None, num_classes: int | None = None,
    name: str = "datasets", fingerprint: str | None = None,
) -> Task:
    """Build a task from map-style datasets yielding ``(input_tensor, label)``.

    The fingerprint hashes every sample unless one is given (pass your own for large data).
    """
    x0, _ = train[0]
    x0 = torch.as_tensor(x0)
    if fingerprint is None:
        parts = [_stack(d) for d in (train, val, test) if d is not None]
        fingerprint = _hash_tensors(*[t for pair in parts for t in pair])
        all_y = torch.cat([pair[1].long() for pair in parts])
        num_classes = _check_labels(name, all_y, num_classes)
    elif num_classes is None:
        raise DataError("from_datasets: give num_classes when you give your own fingerprint")
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


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array, checking its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path} is truncated or corrupt: header says {dims} "
                        f"({expected} bytes) but the file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


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
    """
    root = root or os.environ.get(DATA_ENV)
    if not root:
        raise DataError(f"mnist needs a folder: pass mnist(root=...), use --data mnist:DIR, or "
                        f"set {DATA_ENV}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist")
    arrays = {k: read_idx(_find_idx(root, stem)) for k, stem in _MNIST_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(f"MNIST {split}: {len(arrays[f'x_{split}'])} images but "
                            f"{len(arrays[f'y_{split}'])} labels in {root}")
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
    x_test = images(arrays["x_test"])
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    return Task(name="mnist", train=TensorDataset(x_train, y_train),
                val=TensorDataset(x_val, y_val) if val_size else None,
                test=TensorDataset(x_test, y_test),
                num_classes=10, input_shape=(1, 28, 28), fingerprint=h.hexdigest()[:16])


def limit_train(task: Task, n: int) -> Task:
    """``task`` with only its first ``n`` training samples (quick runs on large data sets).

    The validation and test splits are unchanged, so accuracies stay comparable; the name becomes
    ``"<name>-<n>"`` and the fingerprint changes with ``n``.
    """
    if n < 1:
        raise DataError(f"a training limit must be >= 1, but got {n}")
    train = task.train
    if isinstance(train, TensorDataset):
        train = TensorDataset(*(t[:n] for t in train.tensors))
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
