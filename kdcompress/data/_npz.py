"""A task from a NumPy ``.npz`` file of arrays named by split."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from kdcompress.data._memory import from_tensors
from kdcompress.data._task import Task
from kdcompress.errors import DataError, did_you_mean

__all__ = ["from_numpy"]

_REQUIRED = ("x_train", "y_train", "x_test", "y_test")
_OPTIONAL = ("x_val", "y_val")


def from_numpy(path: str | os.PathLike, *, num_classes: int | None = None,
               name: str | None = None, standardize: bool = False) -> Task:
    """A task from an ``.npz`` file holding ``x_train``, ``y_train``, ``x_test``, ``y_test``
    and optionally ``x_val``, ``y_val``.

    The file is read with ``allow_pickle=False``: it can hold numeric arrays only, never code.
    Inputs are converted to float32 as stored (an image array of shape ``(N, H, W)`` suits
    ``models.mlp()``; store ``(N, 1, H, W)`` for ``models.cnn()``); labels must be integer
    class indices. The arrays are then checked as :func:`from_tensors` checks tensors.

    Parameters
    ----------
    path : path
        The ``.npz`` file (``numpy.savez`` or ``numpy.savez_compressed``).
    num_classes : int, optional
        Inferred from the labels when not given.
    name : str, optional
        Shown in reports; the file's name without suffix by default.
    standardize : bool
        Subtract the training inputs' mean and divide by their standard deviation (one value
        each, as :func:`digits` does), in every split.

    Raises
    ------
    DataError
        The file cannot be read or is not an ``.npz`` archive; a required array is missing (the
        message names it and lists those present), or only one of ``x_val``/``y_val`` is there;
        an array holds Python objects; or the arrays fail :func:`from_tensors`'s checks.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "toy.npz")
    >>> np.savez(f, x_train=np.random.rand(8, 3), y_train=np.arange(8) % 2,
    ...          x_test=np.random.rand(4, 3), y_test=np.arange(4) % 2)
    >>> from_numpy(f).input_shape
    (3,)
    """
    path = Path(path).expanduser()
    name = name or path.stem
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"from_numpy: {path} does not exist") from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"from_numpy: cannot read {path} as a .npz file ({exc}); save it with "
                        "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") \
            from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"from_numpy: {path} holds a single array, not a .npz archive of named "
                        "arrays; save it with numpy.savez(path, x_train=..., y_train=..., "
                        "x_test=..., y_test=...)")
    with archive:
        keys = list(archive.files)
        for key in _REQUIRED:
            if key not in keys:
                hint = did_you_mean(key, keys)
                raise DataError(f"from_numpy: {path} has no array '{key}' (it holds "
                                f"{', '.join(keys) or 'no arrays'}).{hint} Required: "
                                f"{', '.join(_REQUIRED)}; optional: {', '.join(_OPTIONAL)}")
        if ("x_val" in keys) != ("y_val" in keys):
            have, lack = ("x_val", "y_val") if "x_val" in keys else ("y_val", "x_val")
            raise DataError(f"from_numpy: {path} has '{have}' but no '{lack}': give both or "
                            "neither")
        arrays = {k: _load(archive, k, path) for k in _REQUIRED + _OPTIONAL if k in keys}
    if standardize:
        arrays = _standardized(arrays, path)
    return from_tensors(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                        x_val=arrays.get("x_val"), y_val=arrays.get("y_val"),
                        num_classes=num_classes, name=name)


def _load(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        array = archive[key]
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(f"from_numpy: array '{key}' in {path} holds Python objects (dtype "
                        "object), which are not read (allow_pickle=False): store numeric arrays"
                        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"from_numpy: array '{key}' in {path} is damaged ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise DataError(f"from_numpy: array '{key}' in {path} has dtype {array.dtype}; inputs "
                        "and labels must be numeric")
    return array


def _standardized(arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Inputs minus the training mean, over the training standard deviation (float32)."""
    train = arrays["x_train"].astype(np.float32)
    mean, std = float(train.mean()), float(train.std())
    if not std > 0:
        raise DataError(f"from_numpy: standardize=True, but x_train in {path} is constant "
                        f"(std {std}): nothing to scale by")
    return {k: (v.astype(np.float32) - mean) / std if k.startswith("x") else v
            for k, v in arrays.items()}
