"""Stable content hashes: of stage constants, of stage functions, of a whole stage.

Pure functions with no knowledge of the run folder or the runner: the declaration layer uses them to
check that a constant can be cached, the runner to decide whether a stage's artifact can be reused.

>>> fingerprint_constant({"rank": 8, "modes": (4, 4)})
{'modes': ['tuple', [4, 4]], 'rank': 8}
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdcompress
from kdcompress.artifacts import module_spec
from kdcompress.errors import PipelineError

__all__ = ["sha256_hex", "tensor_digest", "fingerprint_constant", "function_fingerprint",
           "stage_fingerprint"]


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """One hash over named tensors: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_constant(value: Any, where: str = "constant") -> Any:
    """A JSON-able, stable description of a stage constant.

    Raises
    ------
    PipelineError
        ``value`` has no stable description (an object whose repr is its memory address); the
        message names ``where`` and says what to pass instead.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if getattr(value, "__kdc_deferred__", False):
        raise PipelineError(f"{where} {value!r} is a search parameter without a value yet: "
                            "fingerprint the concrete pipeline (pipeline.concrete(...)), whose "
                            "parameters have values")
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [fingerprint_constant(v, where) for v in value]]
    if isinstance(value, dict):
        return {str(k): fingerprint_constant(v, where) for k, v in sorted(value.items(), key=str)}
    if hasattr(value, "__kdc_fingerprint__"):
        return fingerprint_constant(value.__kdc_fingerprint__(), where)
    if isinstance(value, nn.Module):
        return {"module": module_spec(value), "state": tensor_digest(value.state_dict())}
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_digest({"t": value})}
    if isinstance(value, np.ndarray):
        return {"array": sha256_hex(np.ascontiguousarray(value).tobytes()),
                "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, Path):
        return str(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return {"function": function_fingerprint(value)}
    text = repr(value)
    if " at 0x" in text:
        raise PipelineError(f"{where} {text} cannot be fingerprinted for caching: pass plain "
                            "values (numbers, strings, lists, dicts), a module, or an object with "
                            "a __kdc_fingerprint__() method")
    return {"repr": text}


_PACKAGE_DIGEST: str | None = None


def _package_digest() -> str:
    """Hash of kdcompress's own sources: a built-in stage changes when any of them does."""
    global _PACKAGE_DIGEST
    if _PACKAGE_DIGEST is None:
        root = Path(kdcompress.__file__).parent
        h = hashlib.sha256(kdcompress.__version__.encode())
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        _PACKAGE_DIGEST = h.hexdigest()
    return _PACKAGE_DIGEST


#: ``kdcompress.cli.load_pipeline`` runs a pipeline file as a module named after the file.
PIPELINE_MODULE_PREFIX = "_kdcompress_pipeline_"


def function_fingerprint(fn: Any) -> str:
    """Hash of a stage function: the kdcompress sources for built-ins, the source otherwise.

    A function defined in a pipeline file is known by its name and source, not by the file's
    name: a copy of the file (``best-size.py``, written by a search) keeps its stages cached.
    """
    module = getattr(fn, "__module__", "") or ""
    if module.startswith(PIPELINE_MODULE_PREFIX):
        module = "<pipeline file>"
    name = f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
    if module == "kdcompress" or module.startswith("kdcompress."):
        return sha256_hex(f"{name}:{_package_digest()}".encode())
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        source = repr((code.co_code, code.co_consts)) if code is not None else name
    return sha256_hex(f"{name}:{source}".encode())


_PLAIN = (str, int, float, bool, type(None))


def _is_default(fn: Any, key: str, value: Any) -> bool:
    """Whether ``key=value`` only restates ``fn``'s default (a plain value of the same type), so
    that ``export_onnx(m, tt_export="factorized")`` and ``export_onnx(m)`` share their cache."""
    try:
        parameter = inspect.signature(fn).parameters.get(key)
    except (TypeError, ValueError):  # a callable without a signature
        return False
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return False
    default = parameter.default
    return (isinstance(default, _PLAIN) and type(value) is type(default)
            and value == default)


def stage_fingerprint(fn: Any, constants: Mapping[str, Any], inputs: Mapping[str, Any], *,
                      data: tuple[str, str], seed: int, label: str = "stage") -> str:
    """The content hash deciding whether a stage's artifact can be reused.

    Parameters
    ----------
    fn : callable
        The stage function.
    constants : mapping
        Its constant keywords.
    inputs : mapping
        For each input keyword, the fingerprint (or list of fingerprints) of the stages it reads.
    data : (str, str)
        The data's name and content fingerprint.
    seed : int
        The pipeline's seed.
    """
    constants = {k: v for k, v in constants.items() if not _is_default(fn, k, v)}
    payload = {
        "function": function_fingerprint(fn),
        "constants": {k: fingerprint_constant(v, f"{label}, {k}=")
                      for k, v in sorted(constants.items())},
        "inputs": dict(sorted(inputs.items())),
        "data": list(data),
        "seed": seed,
        "version": kdcompress.__version__,
    }
    return sha256_hex(json.dumps(payload, sort_keys=True, default=str).encode())[:20]
