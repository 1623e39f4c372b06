"""Record a model's activations once, then re-run it from the changed modules onwards.

:class:`Recording` traces a copy of the model with ``torch.fx`` (tensor-train layers stay leaf
modules), runs the unchanged graph once over fixed inputs and keeps the value of every node that
some later re-evaluation will read. :meth:`Recording.logits` then evaluates the model with some
modules replaced by recomputing only the nodes that depend on them, reading every other value
from the cache: the cost of a cell is the cost of the network from the changed layer onwards.

A model ``torch.fx`` cannot trace (data-dependent control flow, ...) gets a :class:`FullForward`
instead, which runs the whole model for every evaluation; ``incremental`` tells them apart.

Examples
--------
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> rec = record(model, torch.randn(10, 4), [{"2"}])
>>> new = nn.Linear(8, 3)
>>> torch.allclose(rec.logits({"2": new}), new(model[1](model[0](rec.x))))
True
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from kdcompress.layers.tt import TT_LAYERS, set_module

__all__ = ["Recording", "FullForward", "record", "disable_inplace"]

log = logging.getLogger(__name__)

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul}


class _Tracer(fx.Tracer):
    """The default tracer, with kdcompress's TT layers kept as leaf modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, TT_LAYERS) or super().is_leaf_module(m, module_qualified_name)


def disable_inplace(model: nn.Module) -> nn.Module:
    """Turn off ``inplace`` on every module of ``model`` (in place; same results, no aliasing)."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def _owner(target: str, names: Collection[str]) -> str | None:
    """The name in ``names`` that is ``target`` or one of its parents."""
    for name in names:
        if target == name or target.startswith(name + "."):
            return name
    return None


def _mutates(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` may change its first argument in place."""
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_")))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return False


def _first(value: Any) -> torch.Tensor:
    """The logits of a model's output (the first element of a tuple or list)."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the model returns {type(value).__name__}, not a tensor of logits")
    return value


class _Partial(fx.Interpreter):
    """Runs a subset of a graph's nodes, with some modules and attributes replaced."""

    def __init__(self, gm: fx.GraphModule, overrides: Mapping[str, nn.Module],
                 capture: dict[str, list[Any]] | None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.overrides = overrides
        self.capture = capture

    def _replaced(self, target: str) -> Any | None:
        name = _owner(target, self.overrides)
        if name is None:
            return None
        obj: Any = self.overrides[name]
        for part in target[len(name):].split(".")[1:]:
            obj = getattr(obj, part)
        return obj

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self._replaced(target)
        if module is None:
            return super().call_module(target, args, kwargs)
        if self.capture is not None and target not in self.capture:
            self.capture[target] = list(args)
        return module(*args, **kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = self._replaced(target)
        return super().get_attr(target, args, kwargs) if value is None else value

    def run_nodes(self, env: dict[fx.Node, Any], nodes: Iterable[fx.Node]) -> dict[fx.Node, Any]:
        self.env = env
        for node in nodes:
            self.env[node] = self.run_node(node)
        return self.env


class Recording:
    """A traced model with the activations that re-evaluations read, on fixed inputs.

    Use :func:`record` to build one.

    Attributes
    ----------
    x : Tensor
        The inputs, ``(N, ...)``.
    baseline : Tensor
        Logits of the unchanged model, ``(N, classes)``.
    incremental : bool
        ``True``: re-evaluations start from the changed modules.
    """

    incremental = True

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor, starts: Iterable[Collection[str]],
                 batch_size: int) -> None:
        self.gm = gm
        self.x = x
        self.batch_size = batch_size
        self.nodes = list(gm.graph.nodes)
        self._modules = dict(gm.named_modules())
        self._output = next(n for n in self.nodes if n.op == "output")
        frontier: set[fx.Node] = set()
        for names in starts:
            frontier |= self._frontier(self._region(names))
        frontier |= set(self._output.all_input_nodes)  # the unchanged outputs: the baseline
        self._frontier_nodes = frontier
        self.cache: list[dict[fx.Node, Any]] = []
        logits = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                chunk = self._record_chunk(x[i:i + batch_size], frontier)
                self.cache.append(chunk)
                logits.append(_first(self._output_value(chunk)).float())
        self.baseline = torch.cat(logits)

    # -- the graph ------------------------------------------------------------------------------

    def starts(self, names: Collection[str]) -> list[fx.Node]:
        """Nodes that call, or read attributes of, the modules ``names``."""
        return [n for n in self.nodes if n.op in ("call_module", "get_attr")
                and _owner(str(n.target), names) is not None]

    def covers(self, names: Collection[str]) -> bool:
        """Whether every one of ``names`` is reached by some node (else the module is unused or
        called in a way the graph does not show)."""
        return all(self.starts([name]) for name in names)

    def _region(self, names: Collection[str]) -> list[fx.Node]:
        """The nodes that depend on ``names``, in graph order."""
        region: set[fx.Node] = set()
        todo = self.starts(names)
        while todo:
            node = todo.pop()
            if node not in region:
                region.add(node)
                todo.extend(node.users)
        return [n for n in self.nodes if n in region and n.op != "output"]

    @staticmethod
    def _frontier(region: list[fx.Node]) -> set[fx.Node]:
        inside = set(region)
        return {a for n in region for a in n.all_input_nodes if a not in inside}

    def _record_chunk(self, x: torch.Tensor, keep: set[fx.Node]) -> dict[fx.Node, Any]:
        interp = _Partial(self.gm, {}, None)
        interp.args_iter = iter([x])
        env: dict[fx.Node, Any] = {}
        kept: dict[fx.Node, Any] = {}
        interp.env = env
        for node in self.nodes:
            if node.op == "output":
                break
            env[node] = interp.run_node(node)
            if node in keep:  # a copy: later in-place ops must not change the record
                value = env[node]
                kept[node] = value.clone() if isinstance(value, torch.Tensor) else value
        return kept

    def _output_value(self, env: Mapping[fx.Node, Any]) -> Any:
        arg = self._output.args[0]
        return fx.node.map_arg(arg, lambda n: env[n])

    # -- evaluation -----------------------------------------------------------------------------

    def logits(self, overrides: Mapping[str, nn.Module],
               capture: dict[str, list[Any]] | None = None) -> torch.Tensor:
        """Logits with the modules ``overrides`` (qualified name -> module) replaced.

        Only the nodes that depend on them are recomputed. ``capture`` receives the arguments of
        each replaced module call on the first chunk of inputs.
        """
        region = self._region(list(overrides))
        if not region:
            return self.baseline.clone()
        frontier = self._frontier(region)
        missing = frontier - self._frontier_nodes
        if missing:
            raise KeyError(f"the recording was not made for modules {sorted(overrides)}: "
                           f"{sorted(n.name for n in missing)} not recorded")
        mutated = {a for n in region
                   if _mutates(n, self._modules.get(str(n.target))) for a in n.args[:1]
                   if isinstance(a, fx.Node) and a in frontier}
        out = []
        with torch.no_grad():
            for i, chunk in enumerate(self.cache):
                env = {n: (chunk[n].clone() if n in mutated else chunk[n]) for n in frontier}
                interp = _Partial(self.gm, overrides, capture if i == 0 else None)
                env = interp.run_nodes(env, region)
                out.append(_first(self._output_value({**chunk, **env})).float())
        return torch.cat(out)

    def module_inputs(self, names: Collection[str]) -> dict[str, list[Any]]:
        """The arguments of the (unchanged) modules ``names`` (one of the recorded sets) on the
        first chunk of inputs; a module not called is left out.

        Runs the first chunk only, and only until the last of those modules has been called.
        """
        overrides = {name: self.gm.get_submodule(name) for name in names}
        region = self._region(list(overrides))
        calls = [i for i, n in enumerate(region) if n.op == "call_module"
                 and _owner(str(n.target), overrides) is not None]
        if not calls:
            return {}
        captured: dict[str, list[Any]] = {}
        chunk = self.cache[0]
        env = {n: chunk[n].clone() if isinstance(chunk[n], torch.Tensor) else chunk[n]
               for n in self._frontier(region)}
        with torch.no_grad():
            _Partial(self.gm, overrides, captured).run_nodes(env, region[:calls[-1] + 1])
        return captured


def _capture_hook(store: dict[str, list[Any]], name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        store.setdefault(name, list(args))  # the first call (the first batch) only

    return hook


class FullForward:
    """Evaluates the whole model for every cell (for models ``torch.fx`` cannot trace)."""

    incremental = False

    def __init__(self, model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
        self.model = model
        self.x = x
        self.batch_size = batch_size
        self.baseline = self._run(model)

    def _run(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([_first(model(self.x[i:i + self.batch_size])).float()
                              for i in range(0, len(self.x), self.batch_size)])

    def logits(self, overrides: Mapping[str, nn.Module],
               capture: dict[str, list[Any]] | None = None) -> torch.Tensor:
        """Logits of the whole model with ``overrides`` swapped in (then swapped back)."""
        originals = {name: self.model.get_submodule(name) for name in overrides}
        handles = []
        try:
            for name, module in overrides.items():
                set_module(self.model, name, module)
                if capture is not None:
                    handles.append(module.register_forward_pre_hook(_capture_hook(capture, name)))
            return self._run(self.model)
        finally:
            for h in handles:
                h.remove()
            for name, module in originals.items():
                set_module(self.model, name, module)

    def module_inputs(self, names: Collection[str]) -> dict[str, list[Any]]:
        """The arguments of the modules ``names`` on the first batch of inputs."""
        captured: dict[str, list[Any]] = {}
        handles = [self.model.get_submodule(n).register_forward_pre_hook(
            _capture_hook(captured, n)) for n in names]
        try:
            with torch.no_grad():
                self.model(self.x[:self.batch_size])
        finally:
            for h in handles:
                h.remove()
        return captured


def record(model: nn.Module, x: torch.Tensor, starts: Iterable[Collection[str]], *,
           batch_size: int = 256, trace: bool = True) -> Recording | FullForward:
    """Record ``model`` (copied, eval mode, in-place ops off) on inputs ``x``.

    Parameters
    ----------
    model : nn.Module
        The model; never changed.
    x : Tensor
        The fixed inputs, ``(N, ...)``.
    starts : iterable of sets of str
        Every set of module names a later :meth:`Recording.logits` call will replace.
    batch_size : int
        Inputs per chunk (bounds the memory of the recording's activations).
    trace : bool
        ``False`` skips ``torch.fx`` and evaluates full forward passes.

    Returns
    -------
    Recording or FullForward
        ``FullForward`` when the model cannot be traced (logged as a warning).
    """
    work = disable_inplace(copy.deepcopy(model).eval())
    starts = [set(s) for s in starts]
    if trace:
        try:
            graph = _Tracer().trace(work)
            gm = fx.GraphModule(work, graph)
            rec = Recording(gm, x, starts, batch_size)
            uncovered = sorted({n for s in starts for n in s if not rec.covers([n])})
            if not uncovered:
                return rec
            reason = f"modules {uncovered[:4]} do not appear as calls in the traced graph"
        except Exception as exc:  # torch.fx raises many types on untraceable code
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("%s cannot be evaluated incrementally (torch.fx: %s): every cell runs a "
                    "full forward pass, which is slower", type(model).__name__, reason)
    return FullForward(work, x, batch_size)
