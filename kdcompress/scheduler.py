"""Running a pipeline: topological order, content-addressed caching, atomic artifacts.

A stage's fingerprint hashes its function, its constants, its inputs' fingerprints, the data's
fingerprint, the seed and the kdcompress version. A stage whose folder ``RUN/stages/<name>`` holds a
complete artifact with the same fingerprint is loaded, not re-run. A stage writes into a temporary
folder that is renamed into place only when complete, so killing the process at any moment and
running again resumes after the last complete stage.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdcompress
from kdcompress import distributed
from kdcompress.artifacts import OnnxModel, load_module, module_spec, save_module
from kdcompress.context import StageContext
from kdcompress.data import Task, digits
from kdcompress.errors import PipelineError, StageError, did_you_mean
from kdcompress.fsutil import atomic_write_text
from kdcompress.metrics import MeasureConfig, measure
from kdcompress.models import ModelSpec
from kdcompress.pipeline import Pipeline, Stage
from kdcompress.progress import NullProgress, Progress
from kdcompress.report import Report

__all__ = ["Scheduler", "RunFailed", "fingerprint_constant", "default_run_dir"]

log = logging.getLogger(__name__)
META_FILE = "meta.json"
ONNX_FILE = "model.onnx"


class RunFailed(StageError):
    """A stage failed; ``report`` holds the rows up to it and the failure."""

    def __init__(self, message: str, stage: str, report: Report) -> None:
        super().__init__(message)
        self.stage = stage
        self.report = report


# ----------------------------------------------------------------------------------------------
# fingerprints


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_constant(value: Any, where: str = "constant") -> Any:
    """A JSON-able, stable description of a stage constant (raises when there is none)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [fingerprint_constant(v, where) for v in value]]
    if isinstance(value, dict):
        return {str(k): fingerprint_constant(v, where) for k, v in sorted(value.items(), key=str)}
    if hasattr(value, "__kdc_fingerprint__"):
        return fingerprint_constant(value.__kdc_fingerprint__(), where)
    if isinstance(value, nn.Module):
        return {"module": module_spec(value), "state": _tensor_digest(value.state_dict())}
    if isinstance(value, torch.Tensor):
        return {"tensor": _tensor_digest({"t": value})}
    if isinstance(value, np.ndarray):
        return {"array": _sha(np.ascontiguousarray(value).tobytes()), "shape": value.shape}
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
    global _PACKAGE_DIGEST
    if _PACKAGE_DIGEST is None:
        root = Path(kdcompress.__file__).parent
        h = hashlib.sha256(kdcompress.__version__.encode())
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        _PACKAGE_DIGEST = h.hexdigest()
    return _PACKAGE_DIGEST


def function_fingerprint(fn: Any) -> str:
    """Hash of a stage function: the kdcompress sources for built-ins, the source otherwise."""
    module = getattr(fn, "__module__", "") or ""
    name = f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
    if module == "kdcompress" or module.startswith("kdcompress."):
        return _sha(f"{name}:{_package_digest()}".encode())
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        source = repr((code.co_code, code.co_consts)) if code is not None else name
    return _sha(f"{name}:{source}".encode())


# ----------------------------------------------------------------------------------------------
# the scheduler


def default_run_dir(pipeline: str, data: str | None = None) -> Path:
    """``runs/<pipeline>``, or ``runs/<pipeline>-<data>`` when the data was swapped for the run.

    Runs of one pipeline on other data keep their own artifacts instead of replacing these.
    """
    return Path("runs") / (pipeline if data is None else f"{pipeline}-{data}")


class Scheduler:
    """Runs one pipeline into one run folder. Use :meth:`Pipeline.run` or ``kdcompress run``."""

    def __init__(self, pipeline: Pipeline, *, out: str | Path | None = None, device: str = "cpu",
                 fresh: bool = False, until: str | None = None, only: str | None = None,
                 data: Task | None = None, threads: int = 1,
                 measure: MeasureConfig | None = None, console: Progress | None = None) -> None:
        self.pipeline = pipeline
        self.order = pipeline.order()
        for flag, name in (("until", until), ("only", only)):
            if name is not None and name not in pipeline.stages:
                raise PipelineError(f"--{flag} '{name}' is not a stage of '{pipeline.name}'."
                                    f"{did_you_mean(name, pipeline.stages)}")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise PipelineError(f"device '{device}' is not supported: use 'cpu' or 'cuda'")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise PipelineError("--device cuda asked for, but PyTorch sees no CUDA GPU here; "
                                "run with --device cpu")
        self.device = distributed.init_from_env(device)
        self.main = distributed.is_main()
        self.fresh = fresh
        self.until = until
        self.only = only
        self.task = data or pipeline.data or digits()
        self.run_dir = Path(out) if out is not None else default_run_dir(
            pipeline.name, None if data is None else self.task.name)
        self.stage_dir = self.run_dir / "stages"
        self.progress = (console or NullProgress()) if self.main else NullProgress()
        self.measure_config = measure or MeasureConfig(threads=threads,
                                                       cuda=self.device.type == "cuda")
        self.baseline = pipeline.baseline_name()
        self.artifacts: dict[str, Any] = {}
        self.fingerprints: dict[str, str] = {}
        self.baseline_predictions: torch.Tensor | None = None
        self.report = Report(pipeline=pipeline.name, device=str(self.device),
                             world_size=distributed.world_size(),
                             data=self.task.name, threads=self.measure_config.threads,
                             baseline=self.baseline,
                             edges=[list(e) for e in pipeline.graph().edges])

    # -- planning ---------------------------------------------------------------------------

    def planned(self) -> list[str]:
        """The stages this run executes, in order."""
        if self.only is not None:
            return [self.only]
        if self.until is not None:
            return self._upstream_of(self.until) + [self.until]
        return list(self.order)

    def _upstream_of(self, name: str) -> list[str]:
        """Every stage ``name`` depends on, directly or not, in execution order."""
        import networkx as nx

        ancestors = nx.ancestors(self.pipeline.graph(), name)
        return [n for n in self.order if n in ancestors]

    def fingerprint(self, stage: Stage) -> str:
        """The content hash that decides whether ``stage`` can come from the cache."""
        payload = {
            "function": function_fingerprint(stage.fn),
            "constants": {k: fingerprint_constant(v, f"stage '{stage.name}', {k}=")
                          for k, v in sorted(stage.constants.items())},
            "inputs": {k: [self.fingerprints[h.name] for h in v] if isinstance(v, list)
                       else self.fingerprints[v.name] for k, v in sorted(stage.inputs.items())},
            "data": [self.task.name, self.task.fingerprint],
            "seed": self.pipeline.seed,
            "version": kdcompress.__version__,
        }
        return _sha(json.dumps(payload, sort_keys=True, default=str).encode())[:20]

    # -- running ----------------------------------------------------------------------------

    def run(self) -> Report:
        """Run the planned stages; return the report (also written to the run folder)."""
        if self.main:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.stage_dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        distributed.barrier()
        planned = self.planned()
        if self.only is not None:
            self._load_inputs_of(self.pipeline.stages[self.only])
        self.progress.start(self.pipeline.name, planned)
        try:
            for name in planned:
                self._run_stage(self.pipeline.stages[name], force=name == self.only)
        finally:
            self.progress.stop()
        return self.report

    def _load_inputs_of(self, stage: Stage) -> None:
        """For ``--only``: every ancestor must already be complete in the run folder."""
        for name in self._upstream_of(stage.name):
            fp = self.fingerprint(self.pipeline.stages[name])
            meta = self._meta(name, fp)
            if meta is None:
                raise PipelineError(f"--only {stage.name} needs '{name}', which is not in "
                                    f"{self.stage_dir} with the current settings; run the "
                                    f"pipeline with --until {name} first")
            self.fingerprints[name] = fp
            self.artifacts[name] = self._load(name, meta)
        if self.baseline in self.artifacts:
            self.baseline_predictions = self._predictions_of(self.baseline)

    def _meta(self, name: str, fingerprint: str | None = None) -> dict[str, Any] | None:
        """The stage's ``meta.json`` when its folder is complete (and has ``fingerprint``)."""
        path = self.stage_dir / name / META_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except ValueError:
            return None
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            return None
        return meta

    def _load(self, name: str, meta: dict[str, Any]) -> Any:
        folder = self.stage_dir / name
        if meta["format"] == "onnx":
            return OnnxModel(folder / meta["file"])
        return load_module(folder)

    def _predictions_of(self, name: str) -> torch.Tensor:
        from kdcompress.metrics import predict

        x, _ = self.task.arrays("test")
        return predict(self.artifacts[name], x).argmax(1)

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

    def _run_stage(self, stage: Stage, *, force: bool) -> None:
        fp = self.fingerprint(stage)
        self.fingerprints[stage.name] = fp
        meta = None if self.fresh or force else self._meta(stage.name, fp)
        cached = distributed.all_gather(meta is not None)[0]  # rank 0 decides for every process
        runs_here = self.main or getattr(stage.fn, "distributed", False)
        self.progress.stage_started(stage.name, stage.fn.__name__, cached)
        started = time.perf_counter()
        error: BaseException | None = None
        row: dict[str, Any] = {}
        try:
            if cached:
                meta = meta or self._meta(stage.name)  # another process: rank 0's folder
                artifact = self._load(stage.name, meta)
            elif runs_here:
                artifact, meta = self._execute(stage, fp)
            if self.main:
                self.artifacts[stage.name] = artifact
                if stage.name == self.baseline:
                    self.baseline_predictions = self._predictions_of(stage.name)
                row = self._measure(stage, artifact, meta, cached)
        except Exception as exc:  # keep the report and the completed stages, name the stage
            error = exc
        failures = distributed.all_gather(None if error is None else repr(error))
        if error is None and any(failures):
            culprit = next(i for i, f in enumerate(failures) if f)
            error = StageError(f"process {culprit} of {len(failures)} failed: {failures[culprit]}")
        if error is not None:
            self._fail(stage, error, time.perf_counter() - started)
        if not self.main:  # rank 0 has written the artifact: every process continues from it
            self.artifacts[stage.name] = artifact if cached else self._load(
                stage.name, self._meta(stage.name))
            return
        self.report.add(row)
        self.report.save(self.run_dir)
        self.progress.stage_finished(row, self.report)

    def _execute(self, stage: Stage, fp: str) -> tuple[Any, dict[str, Any]]:
        if self.main:
            tmp = self.stage_dir / f".tmp-{stage.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        else:  # another process of a data-parallel stage: its files are not kept
            tmp = Path(tempfile.mkdtemp(prefix=f"kdcompress-{stage.name}-"))
        ctx = StageContext(name=stage.name, data=self.task, device=self.device,
                           seed=self.pipeline.seed, workdir=tmp,
                           progress=self.progress.epoch_callback(stage.name))
        kwargs = self._resolve(stage)
        params = inspect.signature(stage.fn).parameters
        if "data" in params:
            kwargs["data"] = self.task
        if "ctx" in params:
            kwargs["ctx"] = ctx
        _seed_everything(self.pipeline.seed)
        started = time.perf_counter()
        result = stage.fn(**kwargs)
        seconds = time.perf_counter() - started
        if not isinstance(result, (OnnxModel, nn.Module)):
            raise StageError(f"stage '{stage.name}' ({stage.fn.__name__}) returned "
                             f"{type(result).__name__}; a stage must return a torch nn.Module "
                             "or a kdcompress OnnxModel")
        meta: dict[str, Any] = {
            "fingerprint": fp, "name": stage.name, "function": stage.function_name,
            "inputs": stage.input_names, "seconds": seconds, "details": ctx.details,
            "warnings": ctx.warnings,
        }
        if not self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            return result, meta
        return self._commit(result, meta, tmp, stage.name)

    def _commit(self, result: Any, meta: dict[str, Any], tmp: Path,
                name: str) -> tuple[Any, dict[str, Any]]:
        """Save a stage's result into ``tmp``, then rename it into place atomically."""
        if isinstance(result, OnnxModel):
            try:
                relative = result.path.resolve().relative_to(tmp.resolve())
            except ValueError:
                result = result.copy_to(tmp, ONNX_FILE)
                relative = Path(ONNX_FILE)
            meta.update(format="onnx", file=str(relative))
        else:
            result = result.cpu().eval()
            save_module(result, tmp)
            meta.update(format="torch")
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1, default=str))
        final = self.stage_dir / name
        if final.exists():
            trash = self.stage_dir / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if isinstance(result, OnnxModel):
            result = OnnxModel(final / meta["file"])
        return result, meta

    def _measure(self, stage: Stage, artifact: Any, meta: dict[str, Any],
                 cached: bool) -> dict[str, Any]:
        folder = self.stage_dir / stage.name
        metrics = measure(artifact, self.task, config=self.measure_config, folder=folder,
                          reference=self.baseline_predictions
                          if stage.name != self.baseline else None)
        row = {"name": stage.name, "function": stage.function_name,
               "inputs": stage.input_names, "format": meta["format"], **metrics,
               "seconds": round(float(meta["seconds"]), 3), "cached": cached,
               "details": meta.get("details", {}), "warnings": meta.get("warnings", [])}
        for warning in row["warnings"]:
            self.progress.warn(stage.name, warning)
        return row

    def _fail(self, stage: Stage, exc: BaseException, seconds: float) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.debug("stage %s failed", stage.name, exc_info=exc)
        self.report.fail(stage.name, stage.function_name, message, seconds)
        if self.main:
            self.report.save(self.run_dir)
        self.progress.stage_failed(stage.name, message)
        raise RunFailed(f"stage '{stage.name}' ({stage.fn.__name__}) failed: {message}",
                        stage.name, self.report) from exc


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
