"""Model artifacts: how a model at one point of a pipeline is saved, loaded and described.

Two kinds flow between stages:

* a torch model (any ``nn.Module``), saved as ``weights.pt`` (its state dict, loaded with
  ``torch.load(..., weights_only=True)``) plus ``module.json``, a recipe that rebuilds the module
  tree: each submodule's class (imported by name, never unpickled) and its plain attributes
  (ints, floats, strings, tuples). Shape-changing stages (pruning, decomposition) need nothing
  special: the recipe records the module tree as it is now.
* an ONNX model (:class:`OnnxModel`), a ``.onnx`` file (and its external data, if any).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcompress.errors import ArtifactError

__all__ = [
    "OnnxModel",
    "save_module",
    "load_module",
    "module_spec",
    "build_module",
    "num_params",
]

WEIGHTS_FILE = "weights.pt"
RECIPE_FILE = "module.json"
_SKIP_ATTRS = {"training", "_is_full_backward_hook", "_compiled_call_impl"}


# ----------------------------------------------------------------------------------------------
# torch modules: structure as JSON + weights as a state dict


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    raise ArtifactError(f"cannot save {where} = {value!r} ({type(value).__name__}): a module "
                        "attribute must be None, a number, a string, or a list/tuple/dict of "
                        "those; keep other state in buffers or rebuild it in forward()")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__size__" in value:
            return torch.Size(value["__size__"])
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        if "__dict__" in value:
            return {k: _decode(v) for k, v in value["__dict__"].items()}
    return value


def module_spec(module: nn.Module, path: str = "model") -> dict[str, Any]:
    """Describe a module tree as JSON: class, plain attributes, parameter and buffer names."""
    cls = type(module)
    if "<locals>" in cls.__qualname__:
        raise ArtifactError(f"cannot save {path}: its class {cls.__qualname__} is defined inside a "
                            "function; define it at module level so it can be imported again")
    attrs = {}
    for key, value in vars(module).items():
        if key.startswith("_") and key not in ("_reversed_padding_repeated_twice",):
            continue
        if key in _SKIP_ATTRS:
            continue
        attrs[key] = _encode(value, f"{path}.{key}")
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "attrs": attrs,
        "parameters": {k: v is not None for k, v in module._parameters.items()},
        "buffers": {k: v is not None for k, v in module._buffers.items()},
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": {k: None if m is None else module_spec(m, f"{path}.{k}")
                     for k, m in module._modules.items()},
    }


def _import_class(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"cannot rebuild a module of class {name}: {exc}. Is the package or "
                            "file that defines it importable?") from exc
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArtifactError(f"{name} is not an nn.Module subclass; refusing to build it")
    return obj


def build_module(
    spec: dict[str, Any], state: dict[str, torch.Tensor], prefix: str = ""
) -> nn.Module:
    """Rebuild a module from :func:`module_spec`'s description and a state dict."""
    cls = _import_class(spec["class"])
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in spec["attrs"].items():
        object.__setattr__(module, key, _decode(value))
    for name, present in spec["parameters"].items():
        module._parameters[name] = nn.Parameter(_take(state, prefix + name)) if present else None
    non_persistent = set(spec["non_persistent"])
    for name, present in spec["buffers"].items():
        if not present:
            module._buffers[name] = None
        elif name in non_persistent:
            raise ArtifactError(f"{prefix}{name} is a non-persistent buffer, which a state dict "
                                "does not hold; make it persistent or compute it in forward()")
        else:
            module._buffers[name] = _take(state, prefix + name)
    for name, child in spec["children"].items():
        module._modules[name] = None if child is None else build_module(
            child, state, f"{prefix}{name}.")
    return module


def _take(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ArtifactError(f"weights file has no tensor '{key}'; the artifact is incomplete")
    return state[key]


def save_module(module: nn.Module, folder: str | os.PathLike) -> None:
    """Save ``module`` into ``folder`` as ``module.json`` + ``weights.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = module_spec(module)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / RECIPE_FILE).write_text(json.dumps(spec))


def load_module(folder: str | os.PathLike) -> nn.Module:
    """Load a module saved by :func:`save_module` (``weights_only=True``, no pickled code)."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / RECIPE_FILE).read_text())
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ArtifactError(f"cannot load the torch model in {folder}: {exc}") from exc
    module = build_module(spec, state)
    return module.eval()


def num_params(model: nn.Module | OnnxModel) -> int:
    """Number of weights: parameters of a torch model, initializer elements of an ONNX one."""
    if isinstance(model, OnnxModel):
        return model.num_params
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# ONNX models


class OnnxModel:
    """An ONNX graph on disk, the artifact of ``export_onnx`` and ``quantize_onnx``.

    Parameters
    ----------
    path : path
        The ``.onnx`` file. External data files next to it (``*.onnx.data``) belong to it.

    Examples
    --------
    >>> model = OnnxModel("runs/tt_distill_quant/stages/int8/model.onnx")  # doctest: +SKIP
    >>> model.predict(x).argmax(1)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"ONNX file {self.path} does not exist")
        self._sessions: dict[tuple, Any] = {}

    def __repr__(self) -> str:
        return f"OnnxModel('{self.path}')"

    @property
    def files(self) -> list[Path]:
        """The graph file and its external data files."""
        import onnx

        proto = onnx.load(str(self.path), load_external_data=False)
        extra = set()
        for init in proto.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    extra.add(self.path.parent / entry.value)
        return [self.path, *sorted(extra)]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the graph plus its external data."""
        return sum(p.stat().st_size for p in self.files if p.exists())

    @property
    def num_params(self) -> int:
        """Elements of all initializers (weights, quantized or not)."""
        import onnx

        proto = onnx.load(str(self.path), load_external_data=False)
        total = 0
        for init in proto.graph.initializer:
            total += int(np.prod(init.dims)) if len(init.dims) else 1
        return total

    def load(self) -> Any:
        """The graph as an ``onnx.ModelProto`` (with its external data)."""
        import onnx

        return onnx.load(str(self.path))

    def session(self, device: str = "cpu", threads: int | None = None) -> Any:
        """An ONNX Runtime inference session (cached per device and thread count)."""
        key = (device, threads)
        if key not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            if device.startswith("cuda"):
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise ArtifactError("ONNX Runtime has no CUDA provider here: install "
                                        "onnxruntime-gpu or measure on cpu")
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self._sessions[key] = ort.InferenceSession(str(self.path), options,
                                                       providers=providers)
        return self._sessions[key]

    @property
    def input_name(self) -> str:
        """The graph's (first) input name."""
        return self.session().get_inputs()[0].name

    def predict(self, x: torch.Tensor | np.ndarray, *, threads: int | None = None) -> torch.Tensor:
        """Run the graph on a batch and return its first output as a float tensor."""
        sess = self.session("cpu", threads)
        array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        out = sess.run(None, {sess.get_inputs()[0].name: array.astype(np.float32)})[0]
        return torch.from_numpy(np.asarray(out))

    def copy_to(self, folder: str | os.PathLike, name: str = "model.onnx") -> OnnxModel:
        """Copy the graph (and external data) into ``folder``; return the copy."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = self.files
        target = folder / name
        if files[1:]:
            import onnx

            proto = onnx.load(str(self.path))
            onnx.save_model(proto, str(target), save_as_external_data=True,
                            location=name + ".data")
        else:
            shutil.copyfile(self.path, target)
        return OnnxModel(target)
