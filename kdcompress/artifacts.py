"""Model artifacts: how a model at one point of a pipeline is saved, loaded and described.

Two kinds flow between stages:

* a torch model (any ``nn.Module``), saved as two files: ``weights.safetensors``, its state
  dict in the safetensors format (tensors and a JSON header stating each one's dtype and shape;
  it cannot carry code), and ``module.json``, a recipe that rebuilds the module tree: each
  submodule's class as ``"module:QualName"`` and its plain attributes (numbers, strings, tuples,
  dtypes). Shape-changing stages (pruning, decomposition) need nothing special: the recipe
  records the module tree as it is now.
* an ONNX model (:class:`OnnxModel`), a ``.onnx`` file (and its external data, if any).

Nothing in a run folder is executed when a torch model is loaded. The recipe may name classes
only from the ``torch`` and ``kdcompress`` packages (imported on demand: they are installed
packages) and from modules that are already imported, such as the pipeline file's own imports;
a module that is not yet imported is never imported to find a class. Every value of the recipe
is checked against the type it must have, and every tensor of the weights file against the
recipe that uses it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from kdcompress.errors import ArtifactError
from kdcompress.fsutil import atomic_write_bytes

__all__ = [
    "OnnxModel",
    "WEIGHTS_FILE",
    "RECIPE_FILE",
    "TRUSTED_PACKAGES",
    "save_module",
    "load_module",
    "module_spec",
    "build_module",
    "num_params",
]

WEIGHTS_FILE = "weights.safetensors"
RECIPE_FILE = "module.json"
#: Packages whose modules a recipe may name even when they are not imported yet.
TRUSTED_PACKAGES = ("torch", "kdcompress")
_LEGACY_WEIGHTS_FILE = "weights.pt"
_TIED_KEY = "kdcompress.tied"  # safetensors metadata: JSON {tied key: stored key}
_SKIP_ATTRS = {"training", "_is_full_backward_hook", "_compiled_call_impl"}
_PRIVATE_ATTRS = {"_reversed_padding_repeated_twice"}  # private attributes that are saved
_SPEC_KEYS = {"class", "attrs", "parameters", "buffers", "non_persistent", "children"}
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


# ----------------------------------------------------------------------------------------------
# torch modules: the recipe's attributes


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


def _decode(value: Any, where: str, recipe: str) -> Any:
    """Invert :func:`_encode`, accepting for each tag only the type that :func:`_encode` writes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, f"{where}[{i}]", recipe) for i, v in enumerate(value)]
    if isinstance(value, dict) and len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tuple__" and isinstance(inner, list):
            return tuple(_decode(v, f"{where}[{i}]", recipe) for i, v in enumerate(inner))
        if tag == "__size__":
            if not (isinstance(inner, list)
                    and all(type(v) is int and v >= 0 for v in inner)):
                raise ArtifactError(f"{recipe}: {where}: a __size__ is a list of sizes >= 0, "
                                    f"but got {_short(inner)}; the recipe is corrupt")
            return torch.Size(inner)
        if tag == "__dtype__":
            dtype = vars(torch).get(inner) if isinstance(inner, str) else None
            if not isinstance(dtype, torch.dtype):
                raise ArtifactError(f"{recipe}: {where}: {_short(inner)} is not a torch dtype "
                                    "(such as 'float32'); the recipe is corrupt")
            return dtype
        if tag == "__dict__" and isinstance(inner, dict):
            return {k: _decode(v, f"{where}[{k!r}]", recipe) for k, v in inner.items()}
    raise ArtifactError(f"{recipe}: {where} = {_short(value)} is not an attribute value kdcompress "
                        "writes (a number, string, list, or one of __tuple__: list, __size__: "
                        "list of ints, __dtype__: name, __dict__: object); the recipe is corrupt")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# torch modules: saving


def module_spec(module: nn.Module, path: str = "model") -> dict[str, Any]:
    """Describe a module tree as JSON: class, plain attributes, parameter and buffer names.

    Parameters
    ----------
    module : nn.Module
        The tree to describe. Every class in it must be defined at module level.
    path : str
        How errors name ``module``.

    Returns
    -------
    dict
        ``{"class": "module:QualName", "attrs": {...}, "parameters": {name: present},
        "buffers": {name: present}, "non_persistent": [...], "children": {name: spec}}``.

    Examples
    --------
    >>> module_spec(nn.Linear(3, 2))["class"]
    'torch.nn.modules.linear:Linear'
    """
    cls = type(module)
    if "<locals>" in cls.__qualname__:
        raise ArtifactError(f"cannot save {path}: its class {cls.__qualname__} is defined inside a "
                            "function; define it at module level so it can be imported again")
    attrs = {}
    for key, value in vars(module).items():
        if key.startswith("_") and key not in _PRIVATE_ATTRS:
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


def save_module(module: nn.Module, folder: str | os.PathLike) -> None:
    """Save ``module`` into ``folder`` as ``module.json`` + ``weights.safetensors``.

    Both files are written to disk (flushed and fsynced) before this returns, so a folder
    renamed into place afterwards survives a crash. A tensor that several keys share (tied
    weights) is stored once, and the keys are tied again by :func:`load_module`.

    Parameters
    ----------
    module : nn.Module
        The model; not modified. Its classes must be importable by name (see
        :func:`load_module`), its attributes plain values (see :func:`module_spec`).
    folder : path
        Created if missing; existing files of the same names are replaced.

    Examples
    --------
    >>> save_module(nn.Linear(3, 2), "runs/demo/stages/linear")  # doctest: +SKIP
    """
    folder = Path(folder)
    spec = module_spec(module)
    state, tied = _state_to_save(module)
    metadata = {_TIED_KEY: json.dumps(tied)} if tied else None
    try:
        weights = safetensors.torch.save(state, metadata=metadata)
    except (ValueError, RuntimeError, SafetensorError) as exc:
        raise ArtifactError(f"cannot save the weights of {type(module).__name__} in "
                            f"{folder}: {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_FILE, weights)  # open, write, flush, fsync, rename
    atomic_write_bytes(folder / RECIPE_FILE, json.dumps(spec).encode("utf-8"))
    _fsync_folder(folder)


def _state_to_save(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU copies of the state, each stored once; ``{tied key: stored key}``."""
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise ArtifactError(f"cannot save model.{key}: the state dict holds a "
                                f"{type(value).__name__} there, but only dense tensors can be "
                                "stored; keep other state in attributes or dense buffers")
        # The same memory seen as the same tensor is a tied weight: stored once, re-tied on load.
        view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                value.dtype, tuple(value.shape), value.stride())
        if value.numel() and view in seen:
            tied[key] = seen[view]
            continue
        seen[view] = key
        # A contiguous copy of its own: safetensors refuses shared or strided storage.
        state[key] = value.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
    return state, tied


def _fsync_folder(folder: Path) -> None:
    """Make the folder's entries durable (POSIX; where a folder cannot be opened, skip)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# torch modules: reading a recipe, which names only trusted classes


@dataclass(frozen=True)
class _Node:
    """One module of a checked recipe: its class resolved, its attributes decoded."""

    where: str
    name: str
    cls: type[nn.Module]
    attrs: dict[str, Any]
    parameters: dict[str, bool]
    buffers: dict[str, bool]
    non_persistent: frozenset[str]
    children: dict[str, _Node | None]


def _fix_import(module_name: str, qualname: str) -> str:
    return (f"import the module that defines {qualname} in the pipeline file (`import "
            f"{module_name}`), so that it is loaded before the run begins")


def _find_module(name: str, module_name: str, qualname: str, where: str, recipe: str,
                 trusted_modules: Collection[str] | None) -> ModuleType:
    """The module a recipe names: under a trusted package (imported if need be) or loaded."""
    parts = module_name.split(".")
    loaded = sys.modules.get(module_name)
    if parts[0] in TRUSTED_PACKAGES:
        if isinstance(loaded, ModuleType):
            return loaded
        if any(p.startswith("__") and p.endswith("__") for p in parts):  # e.g. __main__
            raise ArtifactError(f"{recipe}: {where} names class {name}; refusing to import "
                                f"{module_name}, a module meant to be run, not imported")
        try:  # found through the package's own __path__ only, never the current directory
            return importlib.import_module(module_name)
        except Exception as exc:
            raise ArtifactError(f"{recipe}: cannot rebuild {where}, a module of class {name}: "
                                f"{exc}. Was the run saved by another version of "
                                f"{parts[0]}?") from exc
    fix = _fix_import(module_name, qualname)
    if trusted_modules is not None and module_name not in trusted_modules:
        raise ArtifactError(f"{recipe}: {where} names class {name}, but module {module_name} "
                            "was not imported when the run began, and kdcompress never imports "
                            f"a module that a run folder names; {fix}")
    if not isinstance(loaded, ModuleType):
        raise ArtifactError(f"{recipe}: {where} names class {name}, but module {module_name} is "
                            "not imported, and kdcompress never imports a module that a run "
                            f"folder names (only modules of {' and '.join(TRUSTED_PACKAGES)}); "
                            f"{fix}")
    return loaded


def _resolve_class(name: Any, where: str, recipe: str,
                   trusted_modules: Collection[str] | None) -> type[nn.Module]:
    """The ``nn.Module`` subclass that ``"module:QualName"`` names, without running any code."""
    module_name, _, qualname = name.partition(":") if isinstance(name, str) else ("", "", "")
    if not (_DOTTED.fullmatch(module_name) and _DOTTED.fullmatch(qualname)):
        raise ArtifactError(f"{recipe}: {where} has class {_short(name)}, which is not a "
                            "'package.module:QualName' name; the recipe is corrupt")
    obj: Any = _find_module(name, module_name, qualname, where, recipe, trusted_modules)
    for depth, part in enumerate(qualname.split(".")):
        # Look in the namespace itself: no module __getattr__, descriptor or property runs, and
        # nothing but classes is walked through (a module attribute could lead anywhere).
        if depth and not isinstance(obj, type):
            break
        namespace = vars(obj)
        if part not in namespace:
            raise ArtifactError(f"{recipe}: cannot rebuild {where}, a module of class {name}: "
                                f"{module_name} has no {qualname}. Was the run saved by another "
                                "version of the code?")
        obj = namespace[part]
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArtifactError(f"{recipe}: {where}: {name} is not an nn.Module subclass; refusing "
                            "to build it")
    if (obj.__module__, obj.__qualname__) != (module_name, qualname):
        raise ArtifactError(f"{recipe}: {where}: {name} is another name for "
                            f"{obj.__module__}:{obj.__qualname__}; refusing an alias that "
                            "module_spec does not write")
    return obj


def _check_names(value: Any, key: str, where: str, recipe: str,
                 kinds: tuple[type, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArtifactError(f"{recipe}: {where}: \"{key}\" must be an object, but got "
                            f"{_short(value)}; the recipe is corrupt")
    for name, item in value.items():
        if not name or "." in name:
            raise ArtifactError(f"{recipe}: {where}: \"{key}\" has the name {name!r}; a "
                                "submodule, parameter or buffer name is not empty and has no "
                                "'.'; the recipe is corrupt")
        if not isinstance(item, kinds):
            raise ArtifactError(f"{recipe}: {where}.{name}: \"{key}\" holds {_short(item)}, "
                                f"but must hold {' or '.join(k.__name__ for k in kinds)}; the "
                                "recipe is corrupt")
    return value


def _parse(spec: Any, where: str, recipe: str,
           trusted_modules: Collection[str] | None) -> _Node:
    """Check one level of a recipe (and, recursively, its children) and resolve its class."""
    if not isinstance(spec, dict) or set(spec) != _SPEC_KEYS:
        found = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise ArtifactError(f"{recipe}: {where} must be an object with the keys "
                            f"{sorted(_SPEC_KEYS)}, but got {_short(found)}; the recipe is "
                            "corrupt or from another version of kdcompress")
    cls = _resolve_class(spec["class"], where, recipe, trusted_modules)
    parameters = _check_names(spec["parameters"], "parameters", where, recipe, (bool,))
    buffers = _check_names(spec["buffers"], "buffers", where, recipe, (bool,))
    children = _check_names(spec["children"], "children", where, recipe, (dict, type(None)))
    non_persistent = spec["non_persistent"]
    if not (isinstance(non_persistent, list) and all(n in buffers for n in non_persistent)):
        raise ArtifactError(f"{recipe}: {where}: \"non_persistent\" must list buffer names, "
                            f"but got {_short(non_persistent)}; the recipe is corrupt")
    attrs = _check_names(spec["attrs"], "attrs", where, recipe, (object,))
    members = [*parameters, *buffers, *children]
    clash = sorted({n for n in members if members.count(n) > 1} | (set(attrs) & set(members)))
    bad = sorted(k for k in attrs if (k.startswith("_") and k not in _PRIVATE_ATTRS)
                 or k in _SKIP_ATTRS)
    if clash or bad:
        raise ArtifactError(f"{recipe}: {where}: the names {clash or bad} are "
                            f"{'used twice' if clash else 'not attributes that module_spec saves'}"
                            "; the recipe is corrupt")
    return _Node(
        where=where, name=spec["class"], cls=cls,
        attrs={k: _decode(v, f"{where}.{k}", recipe) for k, v in attrs.items()},
        parameters=parameters, buffers=buffers, non_persistent=frozenset(non_persistent),
        children={k: None if c is None else _parse(c, f"{where}.{k}", recipe, trusted_modules)
                  for k, c in children.items()},
    )


# ----------------------------------------------------------------------------------------------
# torch modules: the tensors each known class expects, from its attributes


def _linear(a: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {"weight": (a["out_features"], a["in_features"]), "bias": (a["out_features"],)}


def _conv(a: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    c_in, c_out, groups = a["in_channels"], a["out_channels"], a["groups"]
    first, second = (c_in, c_out // groups) if a["transposed"] else (c_out, c_in // groups)
    return {"weight": (first, second, *a["kernel_size"]), "bias": (c_out,)}


def _norm(a: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    n = (a["num_features"],)
    return {"weight": n, "bias": n, "running_mean": n, "running_var": n,
            "num_batches_tracked": ()}


def _tt_linear(a: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    ranks, m, n = a["ranks"], a["out_modes"], a["in_modes"]
    shapes = {f"core{k}": (ranks[k], m[k], n[k], ranks[k + 1]) for k in range(len(n))}
    return {**shapes, "bias": (a["out_features"],)}


def _tt_conv(a: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    (_, r1, r2, r3, _), (kh, kw) = a["ranks"], a["kernel_size"]
    c_in, c_out = a["in_channels"], a["out_channels"]
    return {"core0": (r1, c_in, 1, 1), "core1": (r2, r1, kh, 1), "core2": (r3, r2, 1, kw),
            "core3": (c_out, r3, 1, 1), "bias": (c_out,)}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


#: Exact classes (not subclasses, which may store other shapes) whose tensors are checked.
_SHAPES: dict[str, Callable[[dict[str, Any]], dict[str, tuple[int, ...]]]] = {
    **{_class_name(c): _linear for c in (nn.Linear,)},
    **{_class_name(c): _conv for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                       nn.ConvTranspose2d, nn.ConvTranspose3d)},
    **{_class_name(c): _norm for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                       nn.SyncBatchNorm)},
    _class_name(nn.LayerNorm): lambda a: {"weight": tuple(a["normalized_shape"]),
                                          "bias": tuple(a["normalized_shape"])},
    _class_name(nn.GroupNorm): lambda a: {"weight": (a["num_channels"],),
                                          "bias": (a["num_channels"],)},
    _class_name(nn.Embedding): lambda a: {"weight": (a["num_embeddings"], a["embedding_dim"])},
    "kdcompress.layers.tt:TTLinear": _tt_linear,
    "kdcompress.layers.tt:TTConv2d": _tt_conv,
}


def _tt_input_index(module: nn.Module) -> str | None:
    """What is wrong with a TTLinear's ``input_index`` (the gather its forward and its ONNX
    graph run), or None: an index out of range would read another feature or fail at run
    time."""
    index = module._buffers.get("input_index")
    if index is None:
        return None
    try:
        n_pad = math.prod(int(n) for n in module.in_modes)
        in_features = int(module.in_features)
    except (AttributeError, TypeError, ValueError):
        return "its in_modes or in_features are not integers"
    if index.dtype not in (torch.int32, torch.int64) or index.ndim != 1 or index.numel() == 0:
        return (f"input_index must be a non-empty 1-D int32/int64 tensor, but is "
                f"{index.dtype} with shape {tuple(index.shape)}")
    if n_pad % index.numel():
        return (f"input_index has {index.numel()} entries, which do not divide the padded input "
                f"size {n_pad}")
    block = n_pad // index.numel()
    if in_features % block:
        return (f"input_index gathers blocks of {block} features, which do not divide "
                f"in_features={in_features}")
    lowest, highest = int(index.min()), int(index.max())
    if lowest < 0 or highest > in_features // block:
        return (f"input_index values must lie in [0, {in_features // block}] (the last one "
                f"reads zeros), but range over [{lowest}, {highest}]")
    return None


#: Exact classes whose tensor values (not only shapes) are checked on load.
_VALUE_CHECKS: dict[str, Callable[[nn.Module], str | None]] = {
    "kdcompress.layers.tt:TTLinear": _tt_input_index,
}


def _expected_shapes(node: _Node) -> dict[str, tuple[int, ...]]:
    """Shapes the recipe implies for a known class; empty where they cannot be known."""
    rule = _SHAPES.get(node.name)
    if rule is None:
        return {}
    try:
        shapes = rule(node.attrs)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return {}  # attributes of an unexpected form: the shapes cannot be known cheaply
    return {k: v for k, v in shapes.items() if all(type(d) is int for d in v)}


# ----------------------------------------------------------------------------------------------
# torch modules: building


@dataclass
class _Weights:
    """The state dict being consumed, and how errors name it and the recipe."""

    state: Mapping[str, torch.Tensor]
    source: str
    recipe: str
    used: set[str] = field(default_factory=set)
    parameters: dict[int, nn.Parameter] = field(default_factory=dict)  # id(tensor) -> parameter

    def parameter(self, key: str, where: str, shape: tuple[int, ...] | None) -> nn.Parameter:
        """The parameter made of ``key``'s tensor; one parameter per tensor (tied weights)."""
        tensor = self.take(key, where, shape)
        if id(tensor) not in self.parameters:
            trainable = tensor.is_floating_point() or tensor.is_complex()
            self.parameters[id(tensor)] = nn.Parameter(tensor, requires_grad=trainable)
        return self.parameters[id(tensor)]

    def take(self, key: str, where: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        if key not in self.state:
            raise ArtifactError(f"{self.source} has no tensor '{key}', which {self.recipe} "
                                f"needs for {where}; the artifact is incomplete")
        tensor = self.state[key]
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"{self.source}: '{key}' is a {type(tensor).__name__}, not a "
                                "tensor")
        if shape is not None and tuple(tensor.shape) != shape:
            raise ArtifactError(f"{self.source}: tensor '{key}' has shape {tuple(tensor.shape)}, "
                                f"but {self.recipe} builds {where} with shape {shape}; the "
                                "weights and the recipe do not belong together")
        self.used.add(key)
        return tensor


def _instantiate(node: _Node, weights: _Weights, prefix: str) -> nn.Module:
    cls = node.cls
    try:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
    except Exception as exc:
        raise ArtifactError(f"{weights.recipe}: cannot create {node.where} of class "
                            f"{node.name} without its __init__: {exc}") from exc
    for key, value in node.attrs.items():
        object.__setattr__(module, key, value)
    shapes = _expected_shapes(node)
    for name, present in node.parameters.items():
        if not present:
            module._parameters[name] = None
            continue
        module._parameters[name] = weights.parameter(prefix + name, f"{node.where}.{name}",
                                                     shapes.get(name))
    for name, present in node.buffers.items():
        if not present:
            module._buffers[name] = None
        elif name in node.non_persistent:
            raise ArtifactError(f"{weights.recipe}: {node.where}.{name} is a non-persistent "
                                "buffer, which a state dict does not hold; make it persistent or "
                                "compute it in forward()")
        else:
            module._buffers[name] = weights.take(prefix + name, f"{node.where}.{name}",
                                                 shapes.get(name))
    module._non_persistent_buffers_set = set(node.non_persistent)
    check = _VALUE_CHECKS.get(node.name)
    if check is not None:
        problem = check(module)
        if problem:
            raise ArtifactError(f"{weights.source}: {node.where} ({node.name}): {problem}; the "
                                "artifact is corrupt or was altered (recompute it: --fresh)")
    for name, child in node.children.items():
        module._modules[name] = None if child is None else _instantiate(
            child, weights, f"{prefix}{name}.")
    return module


def _build(spec: Any, state: Mapping[str, torch.Tensor], *, recipe: str, source: str,
           trusted_modules: Collection[str] | None) -> nn.Module:
    weights = _Weights(state=state, source=source, recipe=recipe)
    try:
        module = _instantiate(_parse(spec, "model", recipe, trusted_modules), weights, "")
    except RecursionError as exc:
        raise ArtifactError(f"{recipe}: the module tree is nested too deeply; the recipe is "
                            "corrupt") from exc
    extra = sorted(set(state) - weights.used)
    if extra:
        listed = ", ".join(f"'{k}'" for k in extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise ArtifactError(f"{source} holds {len(extra)} tensor(s) that {recipe} does not use: "
                            f"{listed}; the weights and the recipe do not belong together")
    return module


def build_module(
    spec: dict[str, Any], state: Mapping[str, torch.Tensor], *,
    trusted_modules: Collection[str] | None = None,
) -> nn.Module:
    """Rebuild a module from :func:`module_spec`'s description and a state dict.

    No ``__init__`` runs: each module is created empty, given the recipe's attributes and the
    state's tensors. See :func:`load_module` for the classes a recipe may name.

    Parameters
    ----------
    spec : dict
        A recipe, as :func:`module_spec` returns it.
    state : mapping of str to Tensor
        The tensors, keyed as ``module.state_dict()`` keys them. Every one must be used.
    trusted_modules : collection of str, optional
        Names of the modules outside ``torch`` and ``kdcompress`` whose classes may be built;
        only those also imported now count. ``None``: every module imported now.

    Returns
    -------
    nn.Module
        The rebuilt module, in training mode.

    Examples
    --------
    >>> layer = nn.Linear(3, 2)
    >>> rebuilt = build_module(module_spec(layer), layer.state_dict())
    >>> torch.equal(rebuilt.weight, layer.weight)
    True
    """
    return _build(spec, state, recipe="the recipe", source="the state dict",
                  trusted_modules=trusted_modules)


def _read_weights(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, tied keys sharing their stored tensor."""
    try:  # read into memory: tensors mapped from the file would change with it
        data = path.read_bytes()
        state = safetensors.torch.load(data)
        header_size = int.from_bytes(data[:8], "little")  # valid: load() has checked it
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ArtifactError(f"cannot load the torch model in {folder}: {path} is not a "
                            f"complete safetensors file ({exc}); it is missing, truncated or "
                            "corrupt: delete the folder to recompute it") from exc
    try:
        tied = json.loads(metadata.get(_TIED_KEY, "{}"))
    except ValueError:
        tied = None
    if not (isinstance(tied, dict) and all(isinstance(v, str) and v in state and k not in state
                                           for k, v in tied.items())):
        raise ArtifactError(f"{path}: its metadata '{_TIED_KEY}' must map tied keys to stored "
                            f"tensors, but got {_short(metadata.get(_TIED_KEY))}; the file is "
                            "corrupt: delete the folder to recompute it")
    state.update({key: state[stored] for key, stored in tied.items()})
    return state


def load_module(folder: str | os.PathLike, *,
                trusted_modules: Collection[str] | None = None) -> nn.Module:
    """Load a module saved by :func:`save_module`, running no code from ``folder``.

    ``module.json`` may name classes from the ``torch`` and ``kdcompress`` packages, which are
    imported if need be, and from modules that are imported already (``trusted_modules``
    narrows these); any other module is refused, never imported. The weights are read with
    safetensors, which holds tensors only; each must be one that the recipe uses, with the
    shape it implies where that is known (``Linear``, ``Conv*``, ``BatchNorm*``, TT layers ...).

    Parameters
    ----------
    folder : path
        A folder holding ``module.json`` and ``weights.safetensors``.
    trusted_modules : collection of str, optional
        Names of the modules outside ``torch`` and ``kdcompress`` whose classes may be built;
        only those also imported now count. ``None``: every module imported now. A runner
        passes ``set(sys.modules)`` as it was when the run began.

    Returns
    -------
    nn.Module
        The model, in eval mode.

    Raises
    ------
    ArtifactError
        A file is missing, truncated or corrupt, the recipe names a class it may not name, or the
        weights do not fit the recipe; the message names the file.

    Examples
    --------
    >>> save_module(nn.Linear(3, 2), "runs/demo/stages/linear")  # doctest: +SKIP
    >>> load_module("runs/demo/stages/linear", trusted_modules=set(sys.modules))  # doctest: +SKIP
    Linear(in_features=3, out_features=2, bias=True)
    """
    folder = Path(folder)
    recipe, weights = folder / RECIPE_FILE, folder / WEIGHTS_FILE
    try:
        spec = json.loads(recipe.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"cannot load the torch model in {folder}: cannot read {recipe}: "
                            f"{exc}") from exc
    if not weights.is_file() and (folder / _LEGACY_WEIGHTS_FILE).is_file():
        raise ArtifactError(f"cannot load the torch model in {folder}: it holds "
                            f"{_LEGACY_WEIGHTS_FILE}, written by an older kdcompress, which is no "
                            "longer read; delete the folder (or run with --fresh) to recompute it")
    state = _read_weights(weights, folder)
    module = _build(spec, state, recipe=str(recipe), source=str(weights),
                    trusted_modules=trusted_modules)
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

            from kdcompress.deploy import provider_fallback

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
            session = ort.InferenceSession(str(self.path), options, providers=providers)
            # a latency timed on a fallen-back session would be the CPU's under a CUDA label
            message = provider_fallback(session, providers, self.path)
            if message:
                raise ArtifactError(f"{message}, or measure on cpu")
            self._sessions[key] = session
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
