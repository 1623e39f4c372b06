"""Built-in stages, one module each. A stage is a plain function; see :class:`kdcompress.Pipeline`.

Imported lazily, so ``import kdcompress`` stays fast and a stage's heavy dependencies (onnx,
torch-pruning, tensorly) load when it is used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["train", "decompose_tt", "distill", "prune", "export_onnx", "quantize_onnx"]

_MODULES = {"train": "train", "decompose_tt": "decompose", "distill": "distill",
            "prune": "prune", "export_onnx": "export", "quantize_onnx": "quantize"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        fn = getattr(importlib.import_module(f"kdcompress.stages.{_MODULES[name]}"), name)
        globals()[name] = fn  # the submodule import bound the module to this name
        return fn
    raise AttributeError(f"module 'kdcompress.stages' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)


class _Stages(types.ModuleType):
    """Importing ``kdcompress.stages.train`` binds the submodule to the package; keep the stage."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Stages
