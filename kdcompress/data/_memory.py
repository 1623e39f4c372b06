"""Tasks from the user's own tensors or map-style data sets, and smaller training splits."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from kdcompress.data._checks import (
    _as_tensor,
    _check_classes,
    _check_finite,
    _check_inputs,
    _check_label_tensor,
    _check_num_classes,
    _check_shapes,
    _hash_tensors,
    _length,
    _sample,
)
from kdcompress.data._task import Task
from kdcompress.errors import DataError


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


def from_datasets(
    train: Dataset, test: Dataset, *, val: Dataset | None = None, num_classes: int | None = None,
    name: str = "datasets", fingerprint: str | None = None, num_workers: int = 0,
    pin_memory: bool = False,
) -> Task:
    """Build a task from map-style datasets yielding ``(input_tensor, label)``.

    The fingerprint hashes every sample unless one is given (pass your own for large data).
    Without a fingerprint every sample is read once here, one at a time, and checked (only the
    labels are kept); with one, only the first and last sample of each split are read now, and
    each batch is checked when it is first streamed (:meth:`Task.batches`). Training and
    measurement read the splits in batches through DataLoaders with ``num_workers`` worker
    processes, so no split is ever held in memory whole.

    Parameters
    ----------
    train, test : Dataset
        Map-style data sets (``__len__`` and ``__getitem__``) of ``(input, label)`` pairs.
    val : Dataset, optional
        The validation split, which automatic choices use.
    num_classes : int, optional
        Inferred from the labels when not given (required with ``fingerprint``).
    name : str
        Shown in reports.
    fingerprint : str, optional
        Your own content key (a version, a hash of a manifest); stages are cached by it.
    num_workers : int
        DataLoader worker processes for reading samples (0: in the main process).
    pin_memory : bool
        Page-locked batches, for faster copies to a GPU.

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
        h = hashlib.sha256()
        labels = {s: _hash_split(h, d, s) for s, d in splits.items() if d is not None}
        fingerprint = h.hexdigest()[:16]
        num_classes = _check_classes(name, labels, num_classes)
    elif num_classes is None:
        raise DataError("from_datasets: give num_classes when you give your own fingerprint")
    else:
        num_classes = _check_num_classes(num_classes)
    return Task(name=name, train=train, val=val, test=test, num_classes=num_classes,
                input_shape=tuple(x0.shape), fingerprint=fingerprint, num_workers=num_workers,
                pin_memory=pin_memory)


def _hash_split(h, dataset: Dataset, split: str) -> torch.Tensor:
    """Hash one split's inputs, then its labels, into ``h``, reading one sample at a time and
    checking each; return the labels. The bytes hashed are those of the stacked split (as
    ``_hash_tensors`` hashes it), so a data set keeps the fingerprint it had when splits were
    stacked in memory."""
    n = _length(dataset, split)
    x0, _ = _sample(dataset, split, 0)
    h.update(str(((n, *x0.shape), str(x0.dtype))).encode())
    ys = []
    for i in range(n):
        x, y = _sample(dataset, split, i)
        if x.shape != x0.shape:
            raise DataError(f"the {split} split: sample {i} has shape {tuple(x.shape)} but sample "
                            f"0 has shape {tuple(x0.shape)}; every input must have one shape "
                            "(resize or pad them in the data set)")
        if x.is_floating_point() and not bool(torch.isfinite(x.float()).all()):
            raise DataError(f"the {split} split: sample {i} holds NaN or inf (inputs must be "
                            "finite float32 values): repair or drop that sample")
        h.update(x.to(x0.dtype).detach().cpu().contiguous().numpy().tobytes())
        ys.append(y)
    y = torch.stack(ys)
    h.update(str((tuple(y.shape), str(y.dtype))).encode())
    h.update(y.contiguous().numpy().tobytes())
    return y


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
    return dataclasses.replace(task, name=f"{task.name}-{n}", train=train,
                               fingerprint=fingerprint, _cache={})


def subset(dataset: Dataset, n: int) -> Dataset:
    """The first ``n`` samples of a data set."""
    return Subset(dataset, range(min(n, len(dataset))))  # type: ignore[arg-type]
