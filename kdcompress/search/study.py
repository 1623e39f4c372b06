"""Trials through optuna: each one a concrete pipeline run by the runner into one run folder.

>>> from kdcompress.search import Search, SearchConfig
>>> search = Search(pipeline, SearchConfig(max_drop=1.0), RunOptions(out="runs/x"))
... # doctest: +SKIP
>>> result = search.run(trials=20)  # doctest: +SKIP

What a trial is:

- optuna's sampler (multi-objective TPE, or NSGA-II) picks a value for every search parameter;
  :meth:`Pipeline.concrete` turns them into a plain pipeline, which the normal runner runs into
  the search's run folder. The folder keeps one version per stage fingerprint
  (:class:`~kdcompress.fingerprint_store.FingerprintStore`), so a stage whose inputs and constants a
  previous trial already had is loaded, not run: the teacher trains once.
- The objectives (``size``: bytes on disk, ``latency``: median ms at the largest batch timed,
  ``latency_b1``: median ms at batch 1, ``accuracy``: validation points below the baseline) are
  those of the target stage (the pipeline's final stage unless ``target=``); the constraint is
  on validation accuracy: at most ``max_drop`` points below the baseline stage. Trials read the
  validation split only (``RunOptions(read_test=False)``); the test split is read once the
  trials are over, to measure the front.
- Training stages report each epoch's validation accuracy (``ctx.epoch_end``); the ``budget``
  pruner stops a trial whose stage is, at that epoch, below every trial that ended within the
  budget (once :data:`PRUNE_AFTER` of them recorded that epoch). A pruned stage is not cached.
- A value set already tried is not run again: the trial takes the earlier one's results and does
  not count toward the number of trials asked for.
- The front is chosen once the trials are over, on latencies timed again: a trial times its model
  once, next to the baseline, at one moment of the machine's load, and a sub-millisecond graph
  timed that way can read twice as slow as it runs. The final models of the trials within the
  budget are timed once more side by side, in turns (``retime_rounds`` rounds), and the front is
  the Pareto set of those timings; the trials' own timings stay in the table
  (``search_objectives``) and ``SearchResult.retimed`` says which trials the re-timing moved on
  or off the front.

Study and workers: the study lives in ``RUN/search/study.db`` (SQLite) unless ``storage=`` names
another optuna storage. Workers sharing the storage (and the run folder, on one machine) each run
whole trials; together they stop at ``trials``. A trial records its worker (host and PID) and a
heartbeat; a running trial whose worker is gone (its process ended on this host, or no
heartbeat for four intervals) is marked failed and its values queued again, so a search killed
at any moment resumes with no trial lost or repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcompress.data import Task, digits
from kdcompress.errors import (
    CorruptStage,
    KDCompressError,
    PipelineError,
    RunFailed,
    UsageError,
    did_you_mean,
)
from kdcompress.fingerprint import fingerprint_constant
from kdcompress.fingerprint_store import FingerprintStore
from kdcompress.metrics import MeasureConfig, latency_side_by_side
from kdcompress.options import RunOptions
from kdcompress.pipeline import Pipeline
from kdcompress.report import Report
from kdcompress.search.bestfile import write_best_file
from kdcompress.search.front import FrontPoint, SearchResult, TrialSummary, pareto
from kdcompress.search.live import SearchProgress
from kdcompress.search.space import Choice, Param, param_paths, values_text
from kdcompress.search.trial import Heartbeat, TrialObserver
from kdcompress.store import pid_alive

__all__ = ["Search", "SearchConfig", "OBJECTIVES", "SAMPLERS", "PRUNERS", "PRUNE_AFTER",
           "DEFAULT_TRIALS", "MAX_REPEATS"]

#: What can be minimised, measured on the target stage.
OBJECTIVES = {"size": "size on disk (bytes)",
              "latency": "latency at the largest batch timed (batch 64), median (ms)",
              "latency_b1": "latency at batch 1, median (ms)",
              "accuracy": "validation points below the baseline (the drop, minimised)"}
SAMPLERS = ("tpe", "nsga2")
PRUNERS = ("budget", "none")
#: Trials within the budget that must have recorded a stage's epoch before the budget pruner
#: compares a running trial with them there.
PRUNE_AFTER = 3
#: Trials of a search given neither ``trials`` nor ``timeout``.
DEFAULT_TRIALS = 20
#: Proposals in a row of value sets already tried after which a worker stops.
MAX_REPEATS = 25
#: A pruned trial counts as this many validation points over the budget.
_PRUNED_OVER = 100.0


@dataclass(frozen=True)
class SearchConfig:
    """What a search optimises and how.

    Attributes
    ----------
    objectives : tuple of str
        Minimised on the target stage: ``"size"`` (bytes on disk), ``"latency"`` (median ms at
        the largest batch timed), ``"latency_b1"`` (median ms at batch 1), ``"accuracy"``
        (validation points of the pipeline's metric below the baseline: with it the front keeps
        the most accurate trials within the budget too, not only the smallest and fastest).
        Any of them.
    max_drop : float
        The budget: the target's validation accuracy may be at most this many points (percent)
        below the baseline's.
    target : str, optional
        The stage whose model is optimised; the pipeline's final stage by default.
    sampler : str
        ``"tpe"`` (multi-objective TPE with constraints) or ``"nsga2"``.
    pruner : str
        ``"budget"`` (stop a trial that is behind every trial within the budget at the same
        stage and epoch) or ``"none"``.
    startup_trials : int
        Trials sampled at random before TPE models the results; NSGA-II's population size.
    screen : bool
        Before the sampler proposes anything, try the defaults, then each parameter's other
        values one at a time with the rest at their defaults (every other choice; one grid step
        either side of the default, then the two ends, of a range), the parameters of the last
        stages first: those trials recompute only the
        stages after the changed one, so a search's first minutes explore every axis at the
        cost of a few cheap stages; then, for each screening trial on the front, the
        parameters of the stages after the one it changed, on top of its values
        (:meth:`Search.screening`).
    seed : int
        Seeds the sampler (the k-th worker to join a study uses ``seed + k``).
    storage : str, optional
        An optuna storage URL (``postgresql://...`` for workers on several machines);
        ``sqlite:///RUN/search/study.db`` by default.
    study_name : str, optional
        The study's name in the storage; the pipeline's name by default.
    heartbeat : float
        Seconds between a running trial's heartbeats; a trial silent for four of them (or whose
        process ended, on this host) is taken as dead and queued again.
    retime_rounds : int
        Once the trials are over, the final models of the trials within the budget are timed
        again side by side, in turns, this many rounds (the median of the rounds' medians), and
        the front is chosen on those latencies (module docstring); 0 chooses it on each trial's
        own timing.
    latency_tolerance : float
        Latencies within this relative margin of each other count as equal when the front is
        chosen (:func:`kdcompress.search.front.pareto`): a point leaves the front only for one
        that is no larger and no slower beyond the margin, so points a timing cannot tell apart
        do not swap places on noise. 0.05 by default (side-by-side re-timings of the same
        models agree within a few percent); 0 is plain Pareto dominance.
    """

    objectives: tuple[str, ...] = ("size", "latency")
    max_drop: float = 1.0
    target: str | None = None
    sampler: str = "tpe"
    pruner: str = "budget"
    startup_trials: int = 8
    screen: bool = True
    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    heartbeat: float = 30.0
    retime_rounds: int = 3
    latency_tolerance: float = 0.05

    def check(self) -> None:
        """Raise :class:`PipelineError` naming the first setting that cannot work."""
        objectives = tuple(self.objectives)
        if not objectives:
            raise PipelineError(f"a search needs at least one objective: {', '.join(OBJECTIVES)}")
        for name in objectives:
            if name not in OBJECTIVES:
                raise PipelineError(f"objective '{name}' is unknown."
                                    f"{did_you_mean(name, OBJECTIVES)} Use "
                                    f"{' or '.join(OBJECTIVES)}")
        if len(set(objectives)) != len(objectives):
            raise PipelineError(f"objectives {list(objectives)} name one objective twice")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) \
                or not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise PipelineError(f"max_drop must be a number of points >= 0, but got "
                                f"{self.max_drop!r}")
        for key, value, allowed in (("sampler", self.sampler, SAMPLERS),
                                    ("pruner", self.pruner, PRUNERS)):
            if value not in allowed:
                raise PipelineError(f"{key} '{value}' is unknown.{did_you_mean(value, allowed)} "
                                    f"Use {' or '.join(allowed)}")
        if isinstance(self.startup_trials, bool) or not isinstance(self.startup_trials, int) \
                or self.startup_trials < 2:
            raise PipelineError(f"startup_trials must be an integer >= 2, but got "
                                f"{self.startup_trials!r}")
        if not self.heartbeat > 0:
            raise PipelineError(f"heartbeat must be > 0 seconds, but got {self.heartbeat!r}")
        if isinstance(self.retime_rounds, bool) or not isinstance(self.retime_rounds, int) \
                or self.retime_rounds < 0:
            raise PipelineError(f"retime_rounds must be an integer >= 0, but got "
                                f"{self.retime_rounds!r}")
        if isinstance(self.latency_tolerance, bool) \
                or not isinstance(self.latency_tolerance, (int, float)) \
                or not 0 <= self.latency_tolerance < 1:
            raise PipelineError(f"latency_tolerance must be a fraction in [0, 1), e.g. 0.05 for "
                                f"5%, but got {self.latency_tolerance!r}")


def _readable(value: Any) -> Any:
    """A parameter value for JSON and tables: itself when plain, else its repr."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def _encode(param: Param, value: Any) -> Any:
    """A value as optuna stores it (the index of a choice that is not plain)."""
    return param.index(value) if isinstance(param, Choice) and not param.plain else value


class Search:
    """A search over a pipeline's parameters; :meth:`run` = :meth:`optimize` + :meth:`finish`.

    Parameters
    ----------
    pipeline : Pipeline
        A pipeline with search parameters (:attr:`Pipeline.params`).
    config : SearchConfig, optional
        Objectives, budget, sampler, pruner, storage.
    options : RunOptions, optional
        How each trial runs: run folder (``runs/<pipeline>`` by default; the study goes in its
        ``search/``), device, data, latency threads, measurement settings.
    progress : SearchProgress, optional
        Receives the search's events (``RichSearchProgress()`` draws the live table).

    Raises
    ------
    PipelineError
        No search parameter, an unknown target, a target that is the baseline, several final
        stages and no target, data without a validation split, ``fresh``/``only``/``until`` in
        the options, or a setting of ``config`` that cannot work.
    """

    def __init__(self, pipeline: Pipeline, config: SearchConfig | None = None,
                 options: RunOptions | None = None, *,
                 progress: SearchProgress | None = None) -> None:
        self.config = config = config or SearchConfig()
        config.check()
        options = options or RunOptions()
        if not pipeline.params:
            raise PipelineError(f"pipeline '{pipeline.name}' has no search parameter: write "
                                "one as a stage constant, e.g. rank=ks.int(2, 12, default=8) "
                                "with `from kdcompress import search as ks`")
        for flag in ("fresh", "only", "until"):
            if getattr(options, flag):
                raise PipelineError(f"a search cannot run with {flag}: each trial runs the "
                                    "whole pipeline, from the cache where it can")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise PipelineError("kdcompress search does not run under torchrun: start several "
                                "search workers on one --storage instead")
        pipeline.validate()
        _check_timed(config.objectives, options)
        self.pipeline = pipeline
        self.params = dict(pipeline.params)
        self.options = options
        self.task: Task = options.data or pipeline.data or digits()
        if self.task.val is None:
            raise PipelineError(f"data '{self.task.name}' has no validation split: a search "
                                "chooses on validation accuracy and keeps the test split for "
                                "the end; give one (data.from_tensors(..., x_val=, y_val=))")
        self.order = pipeline.order()
        self.baseline = pipeline.baseline_name()
        self.target = self._target(config.target)
        self.run_dir = options.run_dir(pipeline.name)
        self.dir = self.run_dir / "search"
        self.storage = config.storage or f"sqlite:///{(self.dir / 'study.db').absolute()}"
        self.study_name = config.study_name or pipeline.name
        self.host = socket.gethostname()
        self.worker = f"{self.host}:{os.getpid()}"
        self.progress = progress or SearchProgress()
        sizes = [p.size for p in self.params.values()]
        self.space_size = None if None in sizes else math.prod(s for s in sizes if s)
        self._study: Any = None

    def _target(self, name: str | None) -> str:
        stages = self.pipeline.stages
        if name is not None:
            if name not in stages:
                raise PipelineError(f"target '{name}' is not a stage of "
                                    f"'{self.pipeline.name}'.{did_you_mean(name, stages)}")
        else:
            g = self.pipeline.graph()
            finals = [n for n in self.order if g.out_degree(n) == 0]
            if len(finals) > 1:
                raise PipelineError(f"pipeline '{self.pipeline.name}' ends in several stages "
                                    f"({', '.join(finals)}): choose the one to optimise with "
                                    "target= (--target STAGE)")
            name = finals[0]
        if name == self.baseline:
            raise PipelineError(f"target '{name}' is the baseline every stage is compared with: "
                                "choose a later stage, or another baseline (Pipeline(baseline=))")
        return name

    # -- the study --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialises the workers of this run folder while they pick trials."""
        import filelock

        self.dir.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.dir / ".search.lock")):
            yield

    def settings(self) -> dict[str, Any]:
        """What a study is for; a study is resumed only with the same settings."""
        doc = {"pipeline": self.pipeline.name, "data": [self.task.name, self.task.fingerprint],
               "objectives": list(self.config.objectives), "max_drop": self.config.max_drop,
               "target": self.target, "baseline": self.baseline,
               "space": {n: p.describe() for n, p in self.params.items()}}
        metric = getattr(self.pipeline, "metric", None)
        if metric is not None and metric.name != "accuracy":  # accuracy: as studies made before
            doc["metric"] = fingerprint_constant(metric)
        return json.loads(json.dumps(doc))

    @property
    def study(self) -> Any:
        """The optuna study, created or resumed (under the workers' lock) on first use."""
        if self._study is None:
            with self._lock():
                self._study = self._open()
        return self._study

    def _open(self) -> Any:
        import optuna

        storage: Any = self.storage
        try:
            if storage.startswith("sqlite:"):
                storage = optuna.storages.RDBStorage(
                    storage, engine_kwargs={"connect_args": {"timeout": 120}})
            study = optuna.create_study(study_name=self.study_name, storage=storage,
                                        directions=["minimize"] * len(self.config.objectives),
                                        load_if_exists=True)
        except Exception as exc:  # a bad URL, a database that is not there: the user's to fix
            raise UsageError(f"cannot open the study '{self.study_name}' in {self.storage}: "
                             f"{type(exc).__name__}: {exc}") from exc
        settings = self.settings()
        recorded = study.user_attrs.get("kdcompress")
        if recorded is None:
            study.set_user_attr("kdcompress", settings)
            if all(p.has_default for p in self.params.values()):
                study.enqueue_trial({n: _encode(p, p.default) for n, p in self.params.items()},
                                    user_attrs={"default": True})
        elif recorded != settings:
            changed = [k for k in settings if recorded.get(k) != settings[k]]
            raise UsageError(f"the study '{self.study_name}' in {self.storage} was made with "
                             f"other {', '.join(changed)}: keep them to resume it, or start "
                             "another study with --out DIR or --study-name NAME")
        workers = int(study.user_attrs.get("kdcompress_workers", 0))
        study.set_user_attr("kdcompress_workers", workers + 1)
        study.sampler = self._sampler(self.config.seed + workers)
        return study

    def screening(self, trials: list[Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The one-at-a-time trials queued after the defaults: ``(label, values)``.

        Parameters of later stages come first (a trial that changes only the export recomputes
        the export and what follows; one that changes the TT rank recomputes nearly
        everything). Each parameter takes every value of a choice but its default; a range
        takes the values one grid step either side of the base value first (is a little more
        compression as accurate?), then its two ends (what the extremes cost).

        Given the study's ``trials``, the list goes on around the front: a screening trial
        that is on the front (feasible, no feasible trial better at every objective) has the
        parameters of the stages downstream of the one it changed screened again on top of its
        values (``"fp32.tt_export='auto' on trial 3"``). Those trials load everything up to the
        stage that trial computed from the cache, so the combinations of a cheap late setting
        with an expensive early one cost only the late stages.
        """
        if not all(p.has_default for p in self.params.values()):
            return []
        bases: list[tuple[int | None, str | None, dict[str, Any]]] = [
            (None, None, {n: p.default for n, p in self.params.items()})]
        if trials:
            bases += self._front_bases(trials)
        downstream = self._downstream()
        out = []
        for name in reversed(list(self.params)):
            param = self.params[name]
            for number, origin, base in bases:
                if origin is not None and name not in downstream.get(origin, set()):
                    continue
                on = "" if number is None else f" on trial {number}"
                for value in param.screening(base[name]):
                    out.append((f"{name}={_readable(value)!r}{on}", {**base, name: value}))
        return out

    def _downstream(self) -> dict[str, set[str]]:
        """``{parameter: the parameters whose stages all lie downstream of its stages}``."""
        import networkx as nx

        ids = {id(p): n for n, p in self.params.items()}
        stages: dict[str, set[str]] = {n: set() for n in self.params}
        for stage in self.pipeline.stages.values():
            for key, value in stage.constants.items():
                for _, param in param_paths(value, key):
                    if id(param) in ids:
                        stages[ids[id(param)]].add(stage.name)
        graph = self.pipeline.graph()
        out: dict[str, set[str]] = {}
        for name, own in stages.items():
            below = set().union(*(nx.descendants(graph, s) for s in own)) - own
            out[name] = {other for other, theirs in stages.items()
                         if other != name and theirs and theirs <= below}
        return out

    def _front(self, trials: list[Any],
               retimed: Mapping[str, dict[str, float]] | None = None) -> list[Any]:
        """The complete trials within the budget that no other such trial dominates, one per
        value set (the first); on the ``retimed`` objectives of a value set where given."""
        chosen = list(self._candidates(trials).values())
        return [chosen[i] for i in pareto([self._objectives_of(t, retimed) for t in chosen],
                                          self.config.objectives,
                                          tolerance=self.config.latency_tolerance)]

    def _candidates(self, trials: list[Any]) -> dict[str, Any]:
        """The complete trials within the budget, one per value set (the first), by key."""
        import optuna

        candidates: dict[str, Any] = {}
        for t in trials:
            if t.state == optuna.trial.TrialState.COMPLETE and self._feasible(t):
                candidates.setdefault(self._key(t.params), t)
        return candidates

    def _objectives_of(self, t: Any, retimed: Mapping[str, dict[str, float]] | None
                       ) -> dict[str, float]:
        return (retimed or {}).get(self._key(t.params), t.user_attrs["objectives"])

    def _retime(self, trials: list[Any]) -> tuple[dict[str, dict[str, float]],
                                                  dict[str, Any] | None, list[Any]]:
        """The objectives of every candidate for the front with its latencies timed again, side
        by side (by value-set key), what was done, and the front on them: ``({}, None, front)``
        when there is nothing to time again; ``({}, {"note": ...}, front)`` when a model could
        not be loaded (then no trial's timing is replaced: the front is not chosen on two
        rulers)."""
        timed = [o for o in self.config.objectives if o.startswith("latency")]
        candidates = self._candidates(trials)
        before = self._front(trials)
        if not timed or self.config.retime_rounds == 0 or len(candidates) < 2:
            return {}, None, before
        store = FingerprintStore(self.run_dir)
        trusted = frozenset(sys.modules)  # as the runner: classes importable now, none from RUN
        models = []
        for t in candidates.values():
            fingerprint = (t.user_attrs.get("fingerprints") or {}).get(self.target)
            try:
                entry = store.lookup(self.target, fingerprint) if fingerprint else None
                model = None if entry is None else store.load(entry, trusted_modules=trusted)
            except CorruptStage as exc:
                model, why = None, str(exc)
            else:
                why = "it is not in the run folder"
            if model is None:
                return {}, {"note": f"the front is chosen on each trial's own timing: trial "
                                    f"{t.number}'s '{self.target}' could not be loaded to be "
                                    f"timed again ({why})"}, before
            models.append(model)
        config = self.options.measure or MeasureConfig(threads=self.options.threads)
        x = self.task.head(self.task.eval_split, max(config.batch_sizes))
        self.progress.retiming(len(models))
        started, load = time.perf_counter(), _load_average()
        timings = latency_side_by_side(models, x, config, rounds=self.config.retime_rounds)
        retimed: dict[str, dict[str, float]] = {}
        spread = 1.0
        for (key, t), latency in zip(candidates.items(), timings, strict=True):
            objectives = dict(t.user_attrs["objectives"])
            largest = "batch_64" if "batch_64" in latency else "batch_1"  # Row.batch_latency
            for name, batch in (("latency", largest), ("latency_b1", "batch_1")):
                if name in objectives and batch in latency:
                    objectives[name] = float(latency[batch]["p50"])
                    spread = max(spread, float(latency[batch]["spread"]))
            retimed[key] = objectives
        after = self._front(trials, retimed)
        loads = [v for v in (load, _load_average()) if v is not None]
        done = {"models": len(models), "rounds": self.config.retime_rounds,
                "seconds": round(time.perf_counter() - started, 3),
                "load": max(loads) if loads else None, "spread": round(spread, 4),
                "tolerance": self.config.latency_tolerance,
                "joined": sorted({t.number for t in after} - {t.number for t in before}),
                "left": sorted({t.number for t in before} - {t.number for t in after})}
        if spread > 1 + self.config.latency_tolerance + 1e-9:
            done["noisy"] = (f"the re-timing's rounds disagreed by up to {spread:.2f}x, more "
                             f"than the front's latency tolerance of "
                             f"{self.config.latency_tolerance:.0%}: points that close may swap "
                             "places on another timing (a quieter machine, more "
                             "--retime-rounds, or a larger --latency-tolerance)")
        return retimed, done, after

    def _front_bases(self, trials: list[Any]) -> list[tuple[int, str, dict[str, Any]]]:
        """The screening trials on the front: ``(number, parameter it changed, values)``."""
        return [(t.number, str(t.user_attrs["screen"]).partition("=")[0],
                 {n: p.decode(t.params[n]) for n, p in self.params.items()})
                for t in sorted(self._front(trials), key=lambda t: t.number)
                if "screen" in t.user_attrs]

    def _queue_screening(self, trials: list[Any]) -> None:
        """Queue the next screening trial whose values are not in the study yet (one at a
        time, so that values queued again after a worker died run first, and so that the
        front the list grows around is the latest)."""
        if not self.config.screen:
            return
        done = {t.user_attrs.get("screen") for t in trials}
        tried = self._tried(trials)
        for name, values in self.screening(trials):
            params = {n: _encode(p, values[n]) for n, p in self.params.items()}
            if name not in done and self._key(params) not in tried:
                self.study.enqueue_trial(params, user_attrs={"screen": name})
                return

    def _sampler(self, seed: int) -> Any:
        import optuna

        kwargs: dict[str, Any] = {"seed": seed}
        if not hasattr(optuna.trial.Trial, "set_constraint"):  # optuna < 5: constraints_func
            kwargs["constraints_func"] = lambda t: [t.user_attrs["constraint"]]
        with warnings.catch_warnings():  # multivariate and constant_liar are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.config.sampler == "nsga2":
                return optuna.samplers.NSGAIISampler(
                    population_size=self.config.startup_trials, **kwargs)
            return optuna.samplers.TPESampler(n_startup_trials=self.config.startup_trials,
                                              multivariate=True, constant_liar=True, **kwargs)

    @staticmethod
    def _constrain(trial: Any, over: float) -> None:
        """Record how many points over the budget a trial is (<= 0: within it)."""
        if hasattr(trial, "set_constraint"):
            trial.set_constraint("drop", over)
        else:
            trial.set_user_attr("constraint", over)

    # -- counting trials --------------------------------------------------------------------

    @staticmethod
    def _retries(trials: list[Any]) -> dict[int, int]:
        """``{failed trial: the trial queued to redo it}``."""
        return {int(t.user_attrs["retry_of"]): t.number for t in trials
                if "retry_of" in t.user_attrs}

    def _counts(self, trials: list[Any]) -> list[Any]:
        """The trials that count toward ``trials``: each value set once (a trial repeating an
        earlier one's values takes its results and does not count), not those of a dead worker
        that were queued again, not those asked beyond the total."""
        import optuna

        retried = self._retries(trials)
        return [t for t in trials if "duplicate_of" not in t.user_attrs and not (
            t.state == optuna.trial.TrialState.FAIL and (
                t.number in retried or t.user_attrs.get("surplus")))]

    def _key(self, params: Mapping[str, Any]) -> str:
        """A value set as text, by the values the pipeline gets: a grid value stored as
        0.44999999999999996 (suggested) and as 0.45 (enqueued) is one value set."""
        return json.dumps({n: _readable(self.params[n].decode(v)) if n in self.params else v
                           for n, v in params.items()}, sort_keys=True)

    def _tried(self, trials: list[Any]) -> set[str]:
        """The value sets the study has run or is running (:meth:`_key`)."""
        return {self._key(t.params) for t in self._counts(trials)
                if len(t.params) == len(self.params)}

    def _exhausted(self, trials: list[Any]) -> bool:
        if self.space_size is None:
            return False
        return len(self._tried(trials)) >= self.space_size

    def _reclaim(self) -> None:
        """Mark running trials of dead workers failed and queue their values again."""
        import optuna

        grace = 4 * self.config.heartbeat
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
            seen = float(t.user_attrs.get("heartbeat") or t.datetime_start.timestamp())
            if host == self.host and pid.isdigit() and (
                    int(pid) == os.getpid() or not pid_alive(int(pid))):
                why = f"its process {pid} has ended"
            elif now - seen > grace:
                why = f"no heartbeat for {now - seen:.0f} s"
            else:
                continue
            self._requeue(t, f"trial {t.number} was left running ({why})")

    def _requeue(self, trial: Any, message: str) -> None:
        """Mark ``trial`` failed and queue its values again (a screening trial's label goes
        with them)."""
        import optuna

        try:
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):
            return  # another worker finished or reclaimed it first
        attrs = {"retry_of": trial.number}
        if "screen" in trial.user_attrs:
            attrs["screen"] = trial.user_attrs["screen"]
        self.study.enqueue_trial(dict(trial.params), user_attrs=attrs)
        self.progress.warn(f"{message}: marked failed, its values queued again")

    # -- trials -----------------------------------------------------------------------------

    def optimize(self, trials: int | None = None, timeout: float | None = None) -> \
            list[TrialSummary]:
        """Run trials until the study holds ``trials`` of them (workers together), ``timeout``
        seconds have passed, or every value set of a finite space was tried.

        Parameters
        ----------
        trials : int, optional
            Value sets tried in the study when this worker stops, those of earlier runs and of
            other workers included (a trial the sampler proposed with values already tried is
            recorded with the earlier results and does not count); :data:`DEFAULT_TRIALS` when
            neither limit is given.
        timeout : float, optional
            Start no trial after this many seconds.

        Returns
        -------
        list of TrialSummary
            The trials this call ran.
        """
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int)
                                   or trials < 1):
            raise PipelineError(f"trials must be an integer >= 1, but got {trials!r}")
        if timeout is not None and not timeout > 0:
            raise PipelineError(f"timeout must be > 0 seconds, but got {timeout!r}")
        total = trials if trials is not None else (math.inf if timeout else DEFAULT_TRIALS)
        study = self.study
        self.progress.start(self.pipeline.name, self.params, self.run_dir,
                            [self.summary(t) for t in study.get_trials(deepcopy=False)
                             if t.state.is_finished()],
                            {"objectives": self.config.objectives, "target": self.target,
                             "baseline": self.baseline, "max_drop": self.config.max_drop})
        started = time.monotonic()
        done: list[TrialSummary] = []
        repeats = 0
        while timeout is None or time.monotonic() - started < timeout:
            trial = self._next(total)
            if trial is None:
                break
            done.append(self._run_trial(trial))
            repeats = repeats + 1 if done[-1].note.startswith("same values") else 0
            if repeats >= MAX_REPEATS:
                self.progress.warn(f"the sampler proposed {repeats} value sets in a row that "
                                   "were tried before: stopping (widen the space, or change "
                                   "--seed)")
                break
        return done

    def _next(self, total: float) -> Any:
        """The next trial for this worker (a queued one first), or ``None`` when done."""
        import optuna

        waiting_state = optuna.trial.TrialState.WAITING
        with self._lock():
            self._reclaim()
            trials = self.study.get_trials(deepcopy=False)
            if not any(t.state == waiting_state for t in trials):
                if len(self._counts(trials)) >= total:
                    return None
                if self._exhausted(trials):
                    self.progress.warn(f"every one of the {self.space_size} value sets of the "
                                       "space has been tried")
                    return None
                self._queue_screening(trials)
            trial = self.study.ask()
            trial.set_user_attr("worker", self.worker)
            trial.set_user_attr("heartbeat", time.time())
        queued = any(k in trial.user_attrs for k in ("retry_of", "default", "screen"))
        before = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number]
        if not queued and len(self._counts(before)) >= total:
            # a worker on another machine took the last trial at the same moment
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("note", "beyond the number of trials (another worker took the "
                                        "last one first); not run")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        return trial

    def prune_reason(self, stage: str, key: str, epoch: int, value: float,
                     references: list[dict[str, dict[str, float]]]) -> str | None:
        """Why a trial whose ``stage`` reached validation accuracy ``value`` at ``epoch`` should
        stop, or ``None``.

        With the ``budget`` pruner: when at least :data:`PRUNE_AFTER` trials that ended within
        the budget recorded that epoch of the stage run with the same settings (``key``: the
        stage and a hash of its constants), and ``value`` is below every one of them.
        """
        if self.config.pruner == "none":
            return None
        others = [r[key][str(epoch)] for r in references if str(epoch) in r.get(key, {})]
        if len(others) < PRUNE_AFTER or value >= min(others):
            return None
        metric = getattr(getattr(self.pipeline, "metric", None), "name", "accuracy")
        return (f"'{stage}' epoch {epoch}: validation {metric} {100 * value:.2f}% is below every "
                f"one of {len(others)} trials within the budget at that epoch (lowest "
                f"{100 * min(others):.2f}%)")

    def _references(self) -> list[dict[str, dict[str, float]]]:
        import optuna

        return [t.user_attrs.get("curves", {}) for t in self.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if self._feasible(t)]

    def _feasible(self, t: Any) -> bool:
        drop = t.user_attrs.get("drop")
        return drop is not None and drop <= self.config.max_drop + 1e-9

    def _same_as(self, trial: Any) -> Any:
        """A finished trial with the same values, whose results this one takes.

        When an earlier trial with the same values is still running (another worker picked
        them at the same moment), wait for it: a value set is run once.
        """
        import optuna

        key = self._key(trial.params)
        while True:
            same = [t for t in self._counts(self.study.get_trials(deepcopy=False))
                    if t.number != trial.number and self._key(t.params) == key
                    and "duplicate_of" not in t.user_attrs]
            done = next((t for t in same if t.state.is_finished()), None)
            if done is not None:
                return done
            if not any(t.state == optuna.trial.TrialState.RUNNING and t.number < trial.number
                       for t in same):
                return None
            trial.set_user_attr("heartbeat", time.time())
            time.sleep(min(1.0, self.config.heartbeat))
            with self._lock():
                self._reclaim()  # a worker that died running them frees the values

    def _run_trial(self, trial: Any) -> TrialSummary:
        import optuna

        values = {n: p.suggest(trial, n) for n, p in self.params.items()}
        same = self._same_as(trial)
        if same is not None:
            return self._repeat(trial, same)
        self.progress.trial_started(trial.number, {n: _readable(v) for n, v in values.items()})
        observer = TrialObserver(self, trial.number)
        started = time.perf_counter()
        try:
            concrete = self.pipeline.concrete(values)
        except PipelineError as exc:  # a value that breaks a rule inside a constant
            return self._end(trial, observer, started, optuna.trial.TrialState.FAIL, str(exc))
        observer = TrialObserver(self, trial.number, trial, self._references(),
                                  {n: _recipe(st) for n, st in concrete.stages.items()})
        try:
            with Heartbeat(trial, self.config.heartbeat):
                report = self._run(concrete, self.dir / "trials" / f"{trial.number:04d}",
                                   observer, read_test=False)
        except RunFailed as exc:
            if isinstance(exc.__cause__, optuna.TrialPruned):
                return self._end(trial, observer, started, optuna.trial.TrialState.PRUNED,
                                 str(exc.__cause__))
            return self._end(trial, observer, started, optuna.trial.TrialState.FAIL, str(exc))
        except BaseException:  # interrupted, or the run folder failed: the values are redone
            with self._lock():
                self._requeue(trial, f"trial {trial.number} stopped")
            raise
        return self._complete(trial, observer, report, started)

    def _run(self, pipeline: Pipeline, report_dir: Path, observer: TrialObserver, *,
             read_test: bool) -> Report:
        from kdcompress.runner import run

        options = dataclasses.replace(
            self.options, by_fingerprint=True, read_test=read_test, report_dir=report_dir,
            plot=False, measure_only=(self.target,),
            until=None if self.target == self.order[-1] else self.target)
        return run(pipeline, options, observer)

    def _complete(self, trial: Any, observer: TrialObserver, report: Report,
                  started: float) -> TrialSummary:
        import optuna

        row, base = report.row(self.target), report.row(self.baseline)
        # the constraint is on the pipeline's metric (report.metric; top-1 accuracy by default),
        # kept under the attribute names of the accuracy-only studies
        if row is None or base is None or row.val_score is None or base.val_score is None:
            return self._end(trial, observer, started, optuna.trial.TrialState.FAIL,
                             f"'{self.target}' or '{self.baseline}' was not measured")
        drop = round(100 * (base.val_score - row.val_score), 6)
        objectives = _objectives(row, self.config.objectives, drop)
        missing = [o for o in self.config.objectives if o not in objectives]
        if missing:  # _check_timed refused these settings; a stage may still not be timed
            return self._end(trial, observer, started, optuna.trial.TrialState.FAIL,
                             f"'{self.target}' has no {' or '.join(missing)}: its latency was "
                             "not measured")
        for key, value in (("val_accuracy", row.val_score),
                           ("baseline_val_accuracy", base.val_score), ("drop", drop),
                           ("metric", report.metric),
                           ("objectives", objectives),
                           ("baseline_objectives",
                            _objectives(base, self.config.objectives, 0.0))):
            trial.set_user_attr(key, value)
        self._constrain(trial, drop - self.config.max_drop)
        return self._end(trial, observer, started, optuna.trial.TrialState.COMPLETE, "",
                         values=[objectives[o] for o in self.config.objectives])

    def _end(self, trial: Any, observer: TrialObserver, started: float, state: Any, note: str,
             values: list[float] | None = None) -> TrialSummary:
        import optuna

        for key, value in (("ran", observer.ran), ("cached", observer.cached),
                           ("seconds", round(time.perf_counter() - started, 3)),
                           ("fingerprints", observer.fingerprints), ("note", note)):
            trial.set_user_attr(key, value)
        if state == optuna.trial.TrialState.PRUNED:
            self._constrain(trial, _PRUNED_OVER)
        frozen = self.study.tell(trial, values, state=state)
        summary = self.summary(frozen)
        self.progress.trial_finished(summary)
        return summary

    def _repeat(self, trial: Any, same: Any) -> TrialSummary:
        """Take the results of an earlier trial with the same values."""
        import optuna

        for key in ("val_accuracy", "baseline_val_accuracy", "drop", "objectives",
                    "baseline_objectives", "fingerprints"):
            if key in same.user_attrs:
                trial.set_user_attr(key, same.user_attrs[key])
        constraints = getattr(same, "constraints", None) or {}
        over = constraints.get("drop", same.user_attrs.get("constraint"))
        if over is not None:
            self._constrain(trial, over)
        for key, value in (("ran", []), ("cached", []), ("seconds", 0.0),
                           ("duplicate_of", same.number),
                           ("note", f"same values as trial {same.number}")):
            trial.set_user_attr(key, value)
        done = same.state == optuna.trial.TrialState.COMPLETE
        frozen = self.study.tell(trial, list(same.values) if done else None, state=same.state)
        summary = self.summary(frozen)
        self.progress.trial_finished(summary)
        return summary

    def summary(self, t: Any) -> TrialSummary:
        """A study trial as a :class:`TrialSummary`."""
        attrs = t.user_attrs
        note = attrs.get("note", "") or (f"screening {attrs['screen']}" if "screen" in attrs
                                         else "")
        state = t.state.name.lower().replace("fail", "failed")
        if state == "failed" and not note:
            retry = self._retries(self.study.get_trials(deepcopy=False)).get(t.number)
            note = ("its worker stopped" + (f"; values queued again as trial {retry}"
                                            if retry is not None else ""))
        values = {n: _readable(p.decode(t.params[n])) for n, p in self.params.items()
                  if n in t.params}
        return TrialSummary(
            number=t.number, state=state, values=values, objectives=attrs.get("objectives"),
            val_accuracy=attrs.get("val_accuracy"),
            baseline_val_accuracy=attrs.get("baseline_val_accuracy"), drop=attrs.get("drop"),
            feasible=t.state.name == "COMPLETE" and self._feasible(t),
            ran=list(attrs.get("ran", [])), cached=list(attrs.get("cached", [])),
            seconds=attrs.get("seconds"), note=note, default=bool(attrs.get("default")),
            baseline_objectives=attrs.get("baseline_objectives"))

    # -- the front --------------------------------------------------------------------------

    def finish(self) -> SearchResult:
        """Measure the front on the test split and write ``RUN/search/frontier.*``,
        ``best-<objective>.py`` and ``best-<objective>.onnx``.

        The test split is read here, once no trial of the study runs or waits; while other
        workers still run trials the result only counts them (``pending``) and nothing is
        written: the last worker writes the front.
        """
        import optuna

        with self._lock():
            self._reclaim()
        trials = self.study.get_trials(deepcopy=False)
        result = SearchResult(pipeline=self.pipeline.name, data=self.task.name,
                              target=self.target, baseline=self.baseline,
                              objectives=tuple(self.config.objectives),
                              max_drop=self.config.max_drop,
                              trials=[self.summary(t) for t in trials])
        result.pending = sum(not t.state.is_finished() for t in trials)
        if result.pending:
            self.progress.finished(result)
            return result
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        retimed, result.retimed, on_front = self._retime(trials)
        for key in ("note", "noisy"):
            if result.retimed is not None and key in result.retimed:
                result.notes.append(result.retimed[key])
        for t, summary in zip(trials, result.trials, strict=True):
            again = retimed.get(self._key(t.params)) if summary.objectives else None
            if again is not None:
                summary.search_objectives, summary.objectives = summary.objectives, again
        first = self.config.objectives[0]
        on_front.sort(key=lambda t: (self._objectives_of(t, retimed)[first], t.number))
        if not on_front and complete:
            closest = min(complete, key=lambda t: (t.user_attrs["drop"], t.number))
            drop = closest.user_attrs["drop"]
            result.closest_miss = {"trial": closest.number, "drop": drop,
                                   "over": round(drop - self.config.max_drop, 6)}
        self.progress.front_started(len(on_front))
        self._measure_defaults(result, trials)
        artifacts: dict[int, Any] = {}
        for t in on_front:
            point, artifact = self._measure_point(t, result, self._objectives_of(t, retimed))
            if point is not None:
                result.front.append(point)
                artifacts[t.number] = artifact
        self._choose_best(result, artifacts)
        result.save(self.dir, plot_png=self.options.plot)
        self.progress.finished(result)
        return result

    def run(self, trials: int | None = None, timeout: float | None = None) -> SearchResult:
        """:meth:`optimize`, then :meth:`finish`."""
        self.optimize(trials, timeout)
        return self.finish()

    def _measure(self, values: Mapping[str, Any], name: str) -> tuple[Report, TrialObserver]:
        observer = TrialObserver(self, -1)
        report = self._run(self.pipeline.concrete(values), self.dir / "front" / name, observer,
                           read_test=True)
        return report, observer

    def _measure_point(self, t: Any, result: SearchResult,
                       objectives: dict[str, float]) -> tuple[FrontPoint | None, Any]:
        values = {n: p.decode(t.params[n]) for n, p in self.params.items()}
        try:
            report, observer = self._measure(values, f"{t.number:04d}")
        except RunFailed as exc:
            result.notes.append(f"trial {t.number} could not be measured on the test split: "
                                f"{exc}")
            return None, None
        row = report.row(self.target)
        assert row is not None and row.accuracy is not None
        point = FrontPoint(trial=t.number, values={n: _readable(v) for n, v in values.items()},
                           objectives=objectives,
                           val_accuracy=t.user_attrs["val_accuracy"], drop=t.user_attrs["drop"],
                           accuracy=row.accuracy, agreement=row.agreement,
                           size_bytes=row.size_bytes, latency_ms=row.latency_ms)
        return point, observer.artifacts[self.target]

    def _measure_defaults(self, result: SearchResult, trials: list[Any]) -> None:
        """The baseline and the file's default pipeline, measured like the front."""
        if not all(p.has_default for p in self.params.values()):
            result.notes.append("some search parameters have no default: the file's default "
                                "pipeline is not shown")
            return
        defaults = {n: p.default for n, p in self.params.items()}
        number = next((t.number for t in trials if t.user_attrs.get("default")), None)
        try:
            report, _ = self._measure(defaults, "default")
        except RunFailed as exc:
            result.notes.append(f"the default pipeline could not be measured: {exc}")
            return
        base, row = report.row(self.baseline), report.row(self.target)
        assert base is not None and row is not None
        result.baseline_point = _point(base, self.baseline, {}, None)
        result.default_point = _point(row, number, {n: _readable(v) for n, v in
                                                    defaults.items()},
                                      None if base.val_accuracy is None or row.val_accuracy is None
                                      else round(100 * (base.val_accuracy - row.val_accuracy), 6))

    def _choose_best(self, result: SearchResult, artifacts: dict[int, Any]) -> None:
        """For each objective, the front point best at it; its pipeline file and model."""
        for objective in self.config.objectives:
            if not result.front:
                return
            best = min(result.front, key=lambda p: (p.objectives[objective], -p.val_accuracy,
                                                    p.trial))
            best.best_for.append(objective)
            result.best[objective] = best.trial
            trial = self.study.trials[best.trial]
            values = {n: p.decode(trial.params[n]) for n, p in self.params.items()}
            header = [f"best-{objective}: trial {best.trial} of the search in {self.run_dir} "
                      f"({values_text({n: _readable(v) for n, v in values.items()})})",
                      f"validation {100 * best.val_accuracy:.2f}% ({best.drop:+.2f} points "
                      f"against '{self.baseline}'), test {100 * best.accuracy:.2f}%, "
                      f"{_objectives_text(best.objectives)}",
                      f"`kdcompress run {self.dir / f'best-{objective}.py'} --out "
                      f"{self.run_dir}` loads every stage from the search's cache"]
            try:
                write_best_file(self.dir / f"best-{objective}.py", self.params, values,
                                header=header)
                best.files.append(f"best-{objective}.py")
            except KDCompressError as exc:
                result.notes.append(f"best-{objective}.py not written: {exc}")
            try:
                self._write_onnx(artifacts[best.trial], self.dir / f"best-{objective}.onnx")
                best.files.append(f"best-{objective}.onnx")
            except (KDCompressError, OSError) as exc:
                result.notes.append(f"best-{objective}.onnx not written: {exc}")

    def _write_onnx(self, artifact: Any, path: Path) -> None:
        from kdcompress.artifacts import OnnxModel

        if not isinstance(artifact, OnnxModel):  # a torch target: exported as it would ship
            from kdcompress.stages import export_onnx

            artifact = export_onnx(artifact, data=self.task)
        for old in (path, path.with_name(path.name + ".data")):
            if old.exists():
                old.unlink()
        tmp = artifact.copy_to(path.parent / f".tmp-{os.getpid()}", path.name)
        for file in tmp.files:
            os.replace(file, path.parent / file.name)
        shutil.rmtree(tmp.path.parent, ignore_errors=True)


def _recipe(stage: Any) -> str:
    """A short hash of a stage's function and constants (not its inputs)."""
    from kdcompress.fingerprint import fingerprint_constant, sha256_hex

    doc = {"function": stage.function_name,
           "constants": {k: fingerprint_constant(v) for k, v in sorted(stage.constants.items())}}
    return sha256_hex(json.dumps(doc, sort_keys=True, default=str).encode())[:12]


def _check_timed(objectives: tuple[str, ...], options: RunOptions) -> None:
    """Refuse a latency objective at a batch size the measurement does not time."""
    from kdcompress.metrics import MeasureConfig

    sizes = tuple((options.measure or MeasureConfig()).batch_sizes)
    if "latency_b1" in objectives and 1 not in sizes:
        raise PipelineError(f"objective 'latency_b1' needs batch 1 timed, but the measurement "
                            f"times batch sizes {list(sizes)}: add 1 to "
                            "MeasureConfig.batch_sizes or choose another objective")
    if "latency" in objectives and not sizes:
        raise PipelineError("objective 'latency' needs a timed batch size, but "
                            "MeasureConfig.batch_sizes is empty")


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on every platform
        return None


def _objectives(row: Any, names: tuple[str, ...], drop: float) -> dict[str, float]:
    latency = row.batch_latency() or {}
    values = {"size": float(row.size_bytes), "latency": latency.get("p50"),
              "latency_b1": row.latency_ms.get("batch_1", {}).get("p50"), "accuracy": drop}
    return {n: float(values[n]) for n in names if values[n] is not None}


def _objectives_text(objectives: Mapping[str, float]) -> str:
    from kdcompress.report import format_bytes

    return ", ".join(format_bytes(int(v)) if k == "size"
                     else f"{v:+.2f} validation points" if k == "accuracy"
                     else f"{v:.3f} ms {'batch 1' if k == 'latency_b1' else k}"
                     for k, v in objectives.items())


def _point(row: Any, trial: Any, values: dict[str, Any], drop: float | None) -> dict[str, Any]:
    return {"trial": trial, "values": values, "accuracy": row.accuracy,
            "val_accuracy": row.val_accuracy, "agreement": row.agreement, "drop": drop,
            "size_bytes": row.size_bytes, "latency_ms": row.latency_ms}
