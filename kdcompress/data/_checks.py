"""Checks shared by the task builders: samples, labels, shapes, finiteness, hashes."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcompress.errors import DataError


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


def _check_shapes(name: str, inputs: dict[str, torch.Tensor]) -> None:
    """Every split's samples have the shape of ``x_train``'s."""
    shape = tuple(inputs["x_train"].shape[1:])
    for key, x in inputs.items():
        if tuple(x.shape[1:]) != shape:
            raise DataError(f"{name}: x_train samples have shape {shape} but {key} samples have "
                            f"shape {tuple(x.shape[1:])}; every split must hold inputs of one "
                            "shape")

