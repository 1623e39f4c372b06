"""Declaring a pipeline: a DAG of stages, checked as it is declared.

>>> from kdcompress import Pipeline, data, models
>>> from kdcompress.stages import train, decompose_tt
>>> pipeline = Pipeline("demo", data=data.digits(), seed=0)
>>> teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=16), epochs=2)
>>> student = pipeline.stage(decompose_tt, out="student", model=teacher, rank=4)
>>> pipeline.order()
['teacher', 'student']

``pipeline.stage`` binds the keywords to the function's signature at once; a keyword whose value is
a :class:`Handle` (what ``stage`` returns, or ``pipeline.ref("name")`` for a stage declared later)
is an edge of the DAG, every other keyword is a constant. :meth:`Pipeline.validate` checks the
whole graph (unknown references, cycles, torch/ONNX kinds) before anything runs.

A constant may be a search parameter (``rank=ks.int(2, 12, default=8)``, see
:mod:`kdcompress.search`): :attr:`Pipeline.params` lists them, :meth:`Pipeline.concrete` gives the
pipeline with chosen values (or the defaults, which is what :meth:`Pipeline.run` runs), and
:meth:`Pipeline.search` explores them.
"""

from __future__ import annotations

import copy
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import nn

from kdcompress.artifacts import OnnxModel
from kdcompress.data import Task
from kdcompress.declare import check_arguments
from kdcompress.errors import PipelineError, did_you_mean
from kdcompress.fingerprint import fingerprint_constant
from kdcompress.scoring import Metric, MetricLike
from kdcompress.search.space import Choice, Param, param_paths, substitute

if typing.TYPE_CHECKING:
    from kdcompress.options import RunOptions
    from kdcompress.progress import Progress
    from kdcompress.report import Report
    from kdcompress.search.front import SearchResult
    from kdcompress.search.live import SearchProgress
    from kdcompress.search.study import SearchConfig

__all__ = ["Pipeline", "Handle", "Stage"]

#: Parameters the scheduler fills in itself; a pipeline file never passes them.
INJECTED = ("data", "ctx", "metric")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Handle:
    """A reference to a stage's output; pass it as a keyword to later stages."""

    name: str
    pipeline_id: int = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return f"<{self.name}>"


@dataclass
class Stage:
    """One declared stage: its output name, function, edges and constants."""

    name: str
    fn: Callable[..., Any]
    inputs: dict[str, Handle | list[Handle]]
    constants: dict[str, Any]
    index: int

    @property
    def input_names(self) -> list[str]:
        """Names of the stages this one reads, in keyword order."""
        names: list[str] = []
        for value in self.inputs.values():
            for handle in value if isinstance(value, list) else [value]:
                if handle.name not in names:
                    names.append(handle.name)
        return names

    @property
    def function_name(self) -> str:
        """``module.function`` of the stage's function."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


def _kind(annotation: Any) -> set[str]:
    """The artifact kinds ('torch', 'onnx') an annotation admits; empty when unknown."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return set()
    args = typing.get_args(annotation)
    if args:
        kinds: set[str] = set()
        for arg in args:
            kinds |= _kind(arg)
        return kinds
    if isinstance(annotation, type):
        if issubclass(annotation, OnnxModel):
            return {"onnx"}
        if issubclass(annotation, nn.Module):
            return {"torch"}
    return set()


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: kinds are checked when the stage runs
        return {}


class Pipeline:
    """A compression pipeline: named stages connected by the artifacts they read.

    Parameters
    ----------
    name : str
        Names the run folder (``runs/<name>``) and the report.
    data : Task, optional
        The data every stage trains and is measured on; ``data.digits()`` when not given.
    seed : int
        Seeds every stage, so a run repeats exactly.
    baseline : str, optional
        The stage the others are compared with (ratios, agreement); the first stage by default.
    metric : {"accuracy", "top5", "macro_f1"} or callable
        What the report shows by name and every automatic choice uses (the per-epoch
        validation metric of training, the search's constraint, budgets): top-1 accuracy by
        default, top-5 accuracy, macro-averaged F1 (torchmetrics), or ``fn(logits, labels) ->
        float`` in [0, 1], higher is better, checked on a tiny input here. A stage function
        with a ``metric`` parameter receives it, and its cache fingerprint includes it.
    """

    def __init__(self, name: str, *, data: Task | None = None, seed: int = 0,
                 baseline: str | None = None, metric: MetricLike = "accuracy") -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise PipelineError(f"pipeline name {name!r} must be a word of letters, digits, '_' "
                                "or '-' (it names the run folder)")
        if data is not None and not isinstance(data, Task):
            raise PipelineError(f"Pipeline(data=...) takes a kdcompress.data.Task, but got "
                                f"{type(data).__name__}; wrap your data with "
                                "data.from_tensors(...) or data.from_datasets(...)")
        self.name = name
        self.data = data
        self.seed = seed
        #: The metric of every automatic choice and of the report (a ``scoring.Metric``).
        self.metric = Metric.resolve(metric, None if data is None else data.num_classes)
        _seed_globals(seed)
        self.baseline = baseline
        self.stages: dict[str, Stage] = {}
        #: The search parameters among the stages' constants, by name (``"student.rank"``).
        self.params: dict[str, Param] = {}
        #: For a concrete pipeline, the parameter values it was made with.
        self.values: dict[str, Any] = {}
        self._param_names: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, stages={list(self.stages)})"

    def ref(self, name: str) -> Handle:
        """A reference to stage ``name`` by its name, which may be declared later."""
        return Handle(name, id(self))

    def stage(self, fn: Callable[..., Any], *, out: str, **kwargs: Any) -> Handle:
        """Declare a stage: ``out = fn(**kwargs)``; returns a handle to its output.

        Raises
        ------
        PipelineError
            On a duplicate or malformed name, a keyword the function does not take, a missing
            required keyword, or a handle from another pipeline.
        """
        if not callable(fn):
            raise PipelineError(f"stage '{out}': {fn!r} is not a function")
        if not isinstance(out, str) or not _NAME.match(out):
            raise PipelineError(f"stage name {out!r} must be a word of letters, digits, '_' "
                                "or '-'")
        if out in self.stages:
            raise PipelineError(f"stage '{out}' is declared twice; give each stage its own "
                                "out= name")
        label = f"stage '{out}' ({getattr(fn, '__name__', fn)})"
        signature = inspect.signature(fn)
        for key in INJECTED:
            if key in kwargs and key in signature.parameters:
                raise PipelineError(f"{label}: '{key}' is supplied by the pipeline; remove "
                                    f"{key}=... (set the data with Pipeline(data=...), the "
                                    "metric with Pipeline(metric=...))")
        try:
            signature.bind_partial(**kwargs)
        except TypeError as exc:
            accepted = [p for p in signature.parameters if p not in INJECTED]
            unknown = [k for k in kwargs if k not in signature.parameters]
            hint = did_you_mean(unknown[0], accepted) if unknown else ""
            raise PipelineError(f"{label}: {exc}.{hint} It accepts: "
                                f"{', '.join(accepted)}") from exc
        missing = [p.name for p in signature.parameters.values()
                   if p.default is inspect.Parameter.empty and p.name not in kwargs
                   and p.name not in INJECTED
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if missing:
            raise PipelineError(f"{label} needs {', '.join(f'{m}=' for m in missing)}")
        inputs: dict[str, Handle | list[Handle]] = {}
        constants: dict[str, Any] = {}
        for key, value in kwargs.items():
            handles = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(h, Handle) for h in handles):
                if not all(isinstance(h, Handle) for h in handles):
                    raise PipelineError(f"{label}: {key}= mixes stage outputs with other values")
                for h in handles:
                    if h.pipeline_id != id(self):
                        raise PipelineError(f"{label}: {key}=<{h.name}> belongs to another "
                                            "pipeline")
                inputs[key] = list(handles) if isinstance(value, (list, tuple)) else value
            else:
                constants[key] = value
        check_arguments(fn, constants, label, inputs=inputs)
        for key, value in constants.items():
            found = param_paths(value, key)
            if not found:
                fingerprint_constant(value, f"{label}, {key}=")
            for path, param in found:
                self._add_param(out, path, param, label)
        self.stages[out] = Stage(out, fn, inputs, constants, len(self.stages))
        return Handle(out, id(self))

    def _add_param(self, out: str, path: str, param: Param, label: str) -> None:
        """Name a search parameter (``<stage>.<keyword>`` unless named) and check its values
        can be cached."""
        if id(param) in self._param_names:  # one object used twice is one parameter
            return
        name = param.name or f"{out}.{path}"
        if name in self.params:
            raise PipelineError(f"{label}: two search parameters are named '{name}'; give each "
                                "its own name= (or pass the same parameter object to both)")
        if isinstance(param, Choice):
            for value in param.values:
                fingerprint_constant(value, f"{label}, {path}={param!r}: value")
        self.params[name] = param
        self._param_names[id(param)] = name

    # --- search parameters -----------------------------------------------------------------

    def concrete(self, values: Mapping[str, Any] | None = None) -> Pipeline:
        """This pipeline with every search parameter replaced by a value.

        Parameters
        ----------
        values : mapping of str to Any, optional
            Values by parameter name (:attr:`params`); a parameter not given takes its default.

        Returns
        -------
        Pipeline
            A pipeline with plain constants only (``self`` when it has no parameters), whose
            :attr:`values` records the values; its stages fingerprint like a file written with
            those values as literals.

        Raises
        ------
        PipelineError
            An unknown parameter name, a value the parameter cannot take, a parameter with
            neither a value nor a default, or a value that breaks the stage's rules.

        Examples
        --------
        >>> from kdcompress import Pipeline, data, models, search as ks
        >>> from kdcompress.stages import train, decompose_tt
        >>> p = Pipeline("demo", data=data.digits())
        >>> t = p.stage(train, out="teacher", model=models.cnn(width=16), epochs=1)
        >>> s = p.stage(decompose_tt, out="student", model=t, rank=ks.int(2, 8, default=4))
        >>> p.concrete({"student.rank": 6}).stages["student"].constants["rank"]
        6
        >>> p.concrete().stages["student"].constants["rank"]
        4
        """
        values = dict(values or {})
        unknown = [k for k in values if k not in self.params]
        if unknown:
            raise PipelineError(f"pipeline '{self.name}' has no search parameter '{unknown[0]}'."
                                f"{did_you_mean(unknown[0], self.params)} Its parameters: "
                                f"{', '.join(self.params) or 'none'}")
        if not self.params:
            return self
        chosen: dict[str, Any] = {}
        for name, param in self.params.items():
            if name in values:
                if not param.contains(values[name]):
                    raise PipelineError(f"search parameter '{name}' = {param!r} cannot take "
                                        f"{values[name]!r}")
                chosen[name] = values[name]
            elif param.has_default:
                chosen[name] = param.default
            else:
                raise PipelineError(
                    f"search parameter '{name}' = {param!r} has no default, so the pipeline "
                    "cannot run as it is: give it one (default=...), or explore it with "
                    "`kdcompress search FILE`")
        new = copy.copy(self)
        new.stages, new.params, new.values, new._param_names = {}, {}, chosen, {}

        def pick(param: Param) -> Any:
            return chosen[self._param_names[id(param)]]

        def rehandle(value: Handle | list[Handle]) -> Handle | list[Handle]:
            if isinstance(value, list):
                return [Handle(h.name, id(new)) for h in value]
            return Handle(value.name, id(new))

        for stage in self.stages.values():
            constants = {k: substitute(v, pick) for k, v in stage.constants.items()}
            check_arguments(stage.fn, constants, f"stage '{stage.name}' ({stage.fn.__name__})",
                            inputs=stage.inputs)
            new.stages[stage.name] = Stage(stage.name, stage.fn,
                                           {k: rehandle(v) for k, v in stage.inputs.items()},
                                           constants, stage.index)
        return new

    def search(self, *, trials: int | None = None, timeout: float | None = None,
               config: SearchConfig | None = None, options: RunOptions | None = None,
               progress: SearchProgress | None = None, **overrides: Any) -> SearchResult:
        """Search the parameters: trials through optuna, then the Pareto front on the test
        split (see :class:`kdcompress.search.Search`).

        Parameters
        ----------
        trials : int, optional
            Trials in the study when this call ends (those of earlier calls count); 20 when
            neither ``trials`` nor ``timeout`` is given.
        timeout : float, optional
            Stop starting trials after this many seconds.
        config : SearchConfig, optional
            Objectives, accuracy budget, sampler, pruner, storage.
        options : RunOptions, optional
            How each trial runs (run folder, device, data, measurement).
        progress : SearchProgress, optional
            Receives the search's events; ``RichSearchProgress()`` draws the live table.
        **overrides
            Fields of :class:`~kdcompress.search.SearchConfig` replacing those of ``config``:
            ``pipeline.search(trials=10, max_drop=0.5)``.

        Returns
        -------
        SearchResult
            Every trial, the front measured on the test split, the best pipeline per objective.
        """
        import dataclasses

        from kdcompress.options import RunOptions
        from kdcompress.search.study import Search, SearchConfig

        config = dataclasses.replace(config or SearchConfig(), **overrides)
        return Search(self, config, options or RunOptions(), progress=progress).run(
            trials=trials, timeout=timeout)

    # --- the graph -------------------------------------------------------------------------

    def graph(self) -> nx.DiGraph:
        """The DAG: one node per stage, an edge from each input to its reader."""
        g = nx.DiGraph()
        for stage in self.stages.values():
            g.add_node(stage.name, function=stage.fn.__name__, index=stage.index)
        for stage in self.stages.values():
            for name in stage.input_names:
                g.add_edge(name, stage.name)
        return g

    def validate(self) -> None:
        """Check the whole pipeline before anything runs.

        Raises
        ------
        PipelineError
            No stages; a stage reading an output no stage produces ("did you mean");
            a cycle; a torch stage fed an ONNX model (or the reverse); an unknown baseline.
        """
        if not self.stages:
            raise PipelineError(f"pipeline '{self.name}' has no stages; add some with "
                                "pipeline.stage(fn, out=..., ...)")
        for stage in self.stages.values():
            for name in stage.input_names:
                if name not in self.stages:
                    raise PipelineError(f"stage '{stage.name}' reads '{name}', which no stage "
                                        f"produces.{did_you_mean(name, self.stages)}")
        g = self.graph()
        if not nx.is_directed_acyclic_graph(g):
            cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
            raise PipelineError(f"pipeline '{self.name}' has a cycle: {cycle} -> "
                                f"{nx.find_cycle(g)[0][0]}")
        for stage in self.stages.values():
            hints = _hints(stage.fn)
            for key, value in stage.inputs.items():
                wanted = _kind(hints.get(key, inspect.Parameter.empty))
                for handle in value if isinstance(value, list) else [value]:
                    produced = self.output_kind(handle.name)
                    if wanted and produced and not (produced & wanted):
                        fix = ("export it first with export_onnx" if "onnx" in wanted else
                               "read the output of a stage before export_onnx")
                        raise PipelineError(
                            f"stage '{stage.name}' ({stage.fn.__name__}) takes a "
                            f"{'/'.join(sorted(wanted))} model as {key}=, but '{handle.name}' is "
                            f"a {'/'.join(sorted(produced))} model (from "
                            f"{self.stages[handle.name].fn.__name__}); {fix}")
        if self.baseline is not None and self.baseline not in self.stages:
            raise PipelineError(f"baseline '{self.baseline}' is not a stage."
                                f"{did_you_mean(self.baseline, self.stages)}")

    def output_kind(self, name: str) -> set[str]:
        """Artifact kinds stage ``name`` can return, from its return annotation."""
        return _kind(_hints(self.stages[name].fn).get("return", inspect.Parameter.empty))

    def order(self) -> list[str]:
        """Stage names in execution order (topological, ties broken by declaration order)."""
        self.validate()
        g = self.graph()
        return list(nx.lexicographical_topological_sort(g, key=lambda n: g.nodes[n]["index"]))

    def baseline_name(self) -> str:
        """The stage every other one is compared with."""
        return self.baseline or self.order()[0]

    def run(self, options: RunOptions | None = None, *, progress: Progress | None = None,
            **overrides: Any) -> Report:
        """Run the pipeline (search parameters at their defaults); return its
        :class:`~kdcompress.report.Report`.

        Parameters
        ----------
        options : RunOptions, optional
            How to run (run folder, device, cache, partial runs, measurement).
        progress : Progress, optional
            Receives the run's events; ``RichProgress()`` draws the table in the terminal.
        **overrides
            Fields of :class:`~kdcompress.options.RunOptions` replacing those of ``options``:
            ``pipeline.run(out="runs/x", fresh=True)``.

        Raises
        ------
        PipelineError
            A search parameter has no default.
        kdcompress.errors.RunFailed
            A stage failed; the report up to it is written and names it.
        """
        import dataclasses

        from kdcompress.options import RunOptions
        from kdcompress.runner import run

        return run(self, dataclasses.replace(options or RunOptions(), **overrides), progress)


def _seed_globals(seed: int) -> None:
    """Seed the global generators, so models a pipeline file builds after ``Pipeline(...)``
    (``MyNet()``) start from the same weights on every run and their stages stay cached."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
