"""Running a pipeline: the DAG in topological order, each stage from the store or executed.

A stage's fingerprint hashes its function, its constants, its inputs' fingerprints, the data's
fingerprint, the seed and the kdcompress version. A stage is loaded instead of run when the run
folder holds a verified artifact with that fingerprint, computed from byte-identical inputs, and
nothing upstream of it was recomputed in this run. Otherwise it runs into a temporary folder that
is renamed into place when complete, so killing the process at any moment and running again
resumes after the last complete stage.

Stages that are not planned in this run (``--only``, ``--until``) are still loaded and measured
when the store has them, so the report keeps every row it can vouch for.

Search parameters take their defaults (:meth:`Pipeline.concrete`). A run folder made by a search
keeps one folder per stage fingerprint (:class:`~kdcompress.fingerprint_store.FingerprintStore`);
every run into it uses that layout, computing each stage version under a lock of its own.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import nn

from kdcompress import distributed
from kdcompress.artifacts import OnnxModel, load_module
from kdcompress.context import StageContext
from kdcompress.data import Task, digits
from kdcompress.declare import spec_of
from kdcompress.errors import (
    CorruptStage,
    PipelineError,
    RunFailed,
    StageError,
    StoreError,
    did_you_mean,
)
from kdcompress.fingerprint import stage_fingerprint
from kdcompress.fingerprint_store import FingerprintStore, is_fingerprint_layout
from kdcompress.metrics import MeasureConfig
from kdcompress.models import ModelSpec
from kdcompress.observers import Measurer, ReportFiles
from kdcompress.options import RunOptions
from kdcompress.pipeline import Pipeline, Stage
from kdcompress.progress import NullProgress, Progress, StageFinished
from kdcompress.report import Report
from kdcompress.store import Entry, RunStore

__all__ = ["Runner", "run"]

log = logging.getLogger(__name__)


def run(pipeline: Pipeline, options: RunOptions | None = None,
        progress: Progress | None = None) -> Report:
    """Run ``pipeline`` with ``options``; return the report (also written to the run folder).

    Raises
    ------
    PipelineError
        Bad options (unknown ``until``/``only`` stage, unavailable device), ``--only`` without
        its inputs in the run folder, or a search parameter without a default; raised before any
        stage runs.
    StoreError
        The run folder cannot be used (locked with ``wait=False``, not a folder, unwritable).
    RunFailed
        A stage failed; the report up to it is written and names it.
    """
    return Runner(pipeline, options or RunOptions(), progress).run()


class Runner:
    """Runs one pipeline into one run folder. Use :func:`run` or :meth:`Pipeline.run`."""

    def __init__(self, pipeline: Pipeline, options: RunOptions,
                 progress: Progress | None = None) -> None:
        pipeline = pipeline.concrete()  # search parameters at their defaults
        self.pipeline = pipeline
        self.options = options
        self.order = pipeline.order()
        for flag, name in (("until", options.until), ("only", options.only)):
            if name is not None and name not in pipeline.stages:
                raise PipelineError(f"--{flag} '{name}' is not a stage of '{pipeline.name}'."
                                    f"{did_you_mean(name, pipeline.stages)}")
        device = options.device
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise PipelineError(f"device '{device}' is not supported: use 'cpu' or 'cuda'")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise PipelineError("--device cuda asked for, but PyTorch sees no CUDA GPU here; "
                                "run with --device cpu")
        if options.threads < 1:
            raise PipelineError(f"threads must be >= 1, but got {options.threads}")
        self.device = distributed.init_from_env(device)
        self.main = distributed.is_main()
        self.task: Task = options.data or pipeline.data or digits()
        run_dir = options.run_dir(pipeline.name)
        self.store: RunStore | FingerprintStore = (
            FingerprintStore(run_dir) if options.by_fingerprint or is_fingerprint_layout(run_dir)
            else RunStore(run_dir))
        # Classes a module recipe may name: those importable when the run began (the pipeline
        # file's own imports included), never a module found in the run folder.
        self.trusted_modules = frozenset(sys.modules)
        config = options.measure or MeasureConfig(threads=options.threads,
                                                  cuda=self.device.type == "cuda")
        self.report = Report(pipeline=pipeline.name, device=str(self.device),
                             world_size=distributed.world_size(), data=self.task.name,
                             threads=config.threads, baseline=pipeline.baseline_name(),
                             edges=[list(e) for e in pipeline.graph().edges],
                             metric=pipeline.metric.name)
        self.progress = (progress or NullProgress()) if self.main else NullProgress()
        self.observers: list[Progress] = [
            Measurer(self.task, config, self.order, read_test=options.read_test,
                     only=options.measure_only, metric=pipeline.metric),
            ReportFiles(Path(options.report_dir or self.store.run_dir), plot=options.plot),
            self.progress,
        ] if self.main else [NullProgress()]
        self.artifacts: dict[str, Any] = {}
        self.entries: dict[str, Entry] = {}
        self.fingerprints: dict[str, str] = {}
        self.executed: set[str] = set()

    # -- planning ---------------------------------------------------------------------------

    def planned(self) -> list[str]:
        """The stages this run executes (or loads from the cache), in order."""
        if self.options.only is not None:
            return [self.options.only]
        if self.options.until is not None:
            ancestors = nx.ancestors(self.pipeline.graph(), self.options.until)
            return [n for n in self.order if n in ancestors or n == self.options.until]
        return list(self.order)

    def fingerprint(self, stage: Stage) -> str:
        """The content hash that decides whether ``stage`` can come from the store."""
        inputs = {k: [self.fingerprints[h.name] for h in v] if isinstance(v, list)
                  else self.fingerprints[v.name] for k, v in stage.inputs.items()}
        constants = stage.constants
        if "metric" in inspect.signature(stage.fn).parameters:  # the stage's choices use it
            constants = {**constants, "metric": self.pipeline.metric}
        return stage_fingerprint(stage.fn, constants, inputs,
                                 data=(self.task.name, self.task.fingerprint),
                                 seed=self.pipeline.seed, label=f"stage '{stage.name}'")

    # -- running ----------------------------------------------------------------------------

    def run(self) -> Report:
        """Run the planned stages; return the report (also written to the run folder)."""
        if not self.main:
            return self._walk()

        def on_wait(message: str) -> None:
            self.progress.warn("run", message)

        if isinstance(self.store, RunStore):
            with self.store.locked(wait=self.options.wait, on_wait=on_wait):
                if not is_fingerprint_layout(self.store.run_dir):
                    return self._walk()
            # a search converted the folder while this run waited for it: use its layout
            self.store = FingerprintStore(self.store.run_dir)
        with self.store.locked(wait=self.options.wait, on_wait=on_wait):
            return self._walk()

    def _stored_meta(self, name: str) -> dict[str, Any] | None:
        """The ``meta.json`` of stage ``name`` in the run folder (its current fingerprint's
        version when the folder keeps one per fingerprint)."""
        if isinstance(self.store, FingerprintStore):
            return self.store.meta(name, self.fingerprints[name])
        return self.store.meta(name)

    def _stored_folder(self, name: str) -> Path:
        if isinstance(self.store, FingerprintStore):
            return self.store.folder(name, self.fingerprints[name])
        return self.store.stage_dir / name

    def _claim(self, stage: Stage) -> contextlib.AbstractContextManager[Any]:
        """Hold the stage version's lock while it is looked up and computed (a folder shared by
        several search workers); nothing in a folder held by this run alone."""
        if isinstance(self.store, FingerprintStore) and self.main:
            return self.store.claim(stage.name, self.fingerprints[stage.name])
        return contextlib.nullcontext()

    def _walk(self) -> Report:
        distributed.barrier()
        planned = self.planned()
        for name in self.order:
            self.fingerprints[name] = self.fingerprint(self.pipeline.stages[name])
        if self.options.only is not None:
            self._check_only_inputs(self.pipeline.stages[self.options.only])
        self._emit("start", self.pipeline.name, planned)
        try:
            for name in self.order:
                stage = self.pipeline.stages[name]
                missing = [n for n in stage.input_names if n not in self.artifacts]
                if missing and name in planned:
                    raise PipelineError(f"stage '{name}' needs '{missing[0]}', which could not "
                                        "be loaded from the run folder; run the pipeline "
                                        f"with --until {missing[0]} first")
                if missing:
                    continue  # an input is neither planned nor in the store
                if name in planned:
                    self._run_stage(stage, force=name == self.options.only)
                elif self.main:
                    self._load_if_stored(stage)
        finally:
            self._emit("stop")
        return self.report

    def _check_only_inputs(self, stage: Stage) -> None:
        """``--only``: every ancestor must be complete in the run folder (checked up front)."""
        ancestors = nx.ancestors(self.pipeline.graph(), stage.name)
        for name in (n for n in self.order if n in ancestors):
            meta = self._stored_meta(name)
            if meta is None or meta.get("fingerprint") != self.fingerprints[name]:
                raise PipelineError(f"--only {stage.name} needs '{name}', which is not in "
                                    f"{self.store.stage_dir} with the current settings; run the "
                                    f"pipeline with --until {name} first")

    def _lookup(self, stage: Stage, fingerprint: str) -> Entry | None:
        """A usable store entry for ``stage``: verified, from the same input artifacts."""
        if any(n in self.executed for n in stage.input_names):
            return None  # recomputed upstream: everything downstream is recomputed too
        try:
            entry = self.store.lookup(stage.name, fingerprint)
        except CorruptStage as exc:
            self._warn(stage.name, f"{exc}: recomputing {stage.name}")
            return None
        if entry is None:
            return None
        read = entry.meta.get("input_digests")
        current = {n: self.entries[n].digest for n in stage.input_names if n in self.entries}
        if read != current:
            return None  # computed from other versions of its inputs
        return entry

    def _load(self, entry: Entry) -> Any | None:
        try:
            return self.store.load(entry, trusted_modules=self.trusted_modules)
        except CorruptStage as exc:
            self._warn(entry.name, f"{exc}: recomputing {entry.name}")
            return None

    def _load_if_stored(self, stage: Stage) -> None:
        entry = self._lookup(stage, self.fingerprints[stage.name])
        artifact = None if entry is None else self._load(entry)
        if entry is None or artifact is None:
            return
        self.progress.stage_started(stage.name, stage.fn.__name__, True)
        self._finished(stage, artifact, entry, cached=True)

    def _run_stage(self, stage: Stage, *, force: bool) -> None:
        with self._claim(stage):
            self._run_claimed(stage, force=force)

    def _run_claimed(self, stage: Stage, *, force: bool) -> None:
        fp = self.fingerprints[stage.name]
        entry = artifact = None
        if self.main and not (self.options.fresh or force):
            entry = self._lookup(stage, fp)
            artifact = None if entry is None else self._load(entry)
        cached = distributed.all_gather(artifact is not None)[0]  # rank 0 decides for all
        runs_here = self.main or spec_of(stage.fn).distributed
        self._emit("stage_started", stage.name, stage.fn.__name__, cached)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            if not cached and runs_here:
                artifact, entry = self._execute(stage, fp)
                self.executed.add(stage.name)
        except Exception as exc:  # keep the report and the completed stages, name the stage
            error = exc
        failures = distributed.all_gather(None if error is None else repr(error))
        if error is None and any(failures):
            culprit = next(i for i, f in enumerate(failures) if f)
            error = StageError(f"process {culprit} of {len(failures)} failed: {failures[culprit]}")
        if error is not None:
            self._fail(stage, error, time.perf_counter() - started)
        if not self.main:  # rank 0 has written the artifact: every process continues from it
            folder = self._stored_folder(stage.name)
            meta = self._stored_meta(stage.name) or {}
            self.artifacts[stage.name] = (OnnxModel(folder / meta["file"])
                                          if meta.get("format") == "onnx"
                                          else load_module(folder,
                                                           trusted_modules=self.trusted_modules))
            self.executed.add(stage.name)
            return
        try:
            self._finished(stage, artifact, entry, cached=cached)
        except Exception as exc:  # measuring or writing the report failed
            self._fail(stage, exc, time.perf_counter() - started)

    def _finished(self, stage: Stage, artifact: Any, entry: Entry, *, cached: bool) -> None:
        self.artifacts[stage.name] = artifact
        self.entries[stage.name] = entry
        for warning in entry.meta.get("warnings") or []:
            self._warn(stage.name, warning)
        event = StageFinished(name=stage.name, function=stage.function_name,
                              inputs=stage.input_names, role=spec_of(stage.fn).role,
                              artifact=artifact, folder=entry.folder, meta=entry.meta,
                              cached=cached, report=self.report)
        for observer in self.observers:
            observer.stage_finished(event)

    def _resolve(self, stage: Stage) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for key, value in stage.constants.items():
            if isinstance(value, ModelSpec):
                value = value.build(self.task.input_shape, self.task.num_classes)
            else:  # a module or tensor constant belongs to the pipeline: the stage gets a copy
                value = copy.deepcopy(value)
            kwargs[key] = value
        for key, value in stage.inputs.items():
            handles = value if isinstance(value, list) else [value]
            arts = [copy.deepcopy(a) if isinstance(a, nn.Module) else a
                    for a in (self.artifacts[h.name] for h in handles)]
            kwargs[key] = arts if isinstance(value, list) else arts[0]
        return kwargs

    def _execute(self, stage: Stage, fp: str) -> tuple[Any, Entry | None]:
        if self.main:
            tmp = self.store.begin(stage.name)
        else:  # another process of a data-parallel stage: its files are not kept
            tmp = Path(tempfile.mkdtemp(prefix=f"kdcompress-{stage.name}-"))
        try:
            ctx = StageContext(name=stage.name, data=self.task, device=self.device,
                               seed=self.pipeline.seed, workdir=tmp,
                               progress=self.progress.epoch_callback(stage.name),
                               on_epoch=lambda epoch, metrics, name=stage.name: self._emit(
                                   "epoch_end", name, epoch, metrics),
                               metric=self.pipeline.metric)
            kwargs = self._resolve(stage)
            params = inspect.signature(stage.fn).parameters
            if "data" in params:
                kwargs["data"] = self.task
            if "ctx" in params:
                kwargs["ctx"] = ctx
            if "metric" in params:
                kwargs["metric"] = self.pipeline.metric
            seed_everything(self.pipeline.seed)
            started = time.perf_counter()
            result = stage.fn(**kwargs)
            seconds = time.perf_counter() - started
            if not isinstance(result, (OnnxModel, nn.Module)):
                raise StageError(f"returned {type(result).__name__}; a stage must return a "
                                 "torch nn.Module or a kdcompress OnnxModel")
        except BaseException:
            self.store.discard(tmp)
            raise
        if not self.main:
            self.store.discard(tmp)
            return result, None
        meta: dict[str, Any] = {
            "fingerprint": fp, "name": stage.name, "function": stage.function_name,
            "inputs": stage.input_names, "seconds": seconds, "details": ctx.details,
            "warnings": ctx.warnings,
            "input_digests": {n: self.entries[n].digest for n in stage.input_names},
        }
        return self.store.commit(stage.name, tmp, result, meta)

    # -- events -----------------------------------------------------------------------------

    def _emit(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)

    def _warn(self, name: str, message: str) -> None:
        log.debug("%s: %s", name, message)
        self._emit("warn", name, message)

    def _fail(self, stage: Stage, exc: BaseException, seconds: float) -> None:
        message = _describe(exc)
        log.debug("stage %s failed", stage.name, exc_info=exc)
        self.report.fail(stage.name, stage.function_name, message, seconds)
        for observer in self.observers:
            try:
                observer.stage_failed(stage.name, message, self.report)
            except OSError as write_error:  # the disk that failed the stage fails the report
                log.debug("could not record the failure: %s", write_error)
        raise RunFailed(f"stage '{stage.name}' ({stage.fn.__name__}) failed: {message}",
                        stage.name, self.report) from exc


def _describe(exc: BaseException) -> str:
    """One line: the error's class and message (a store error needs no class name)."""
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
