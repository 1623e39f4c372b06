"""Pieces shared by the MNIST benchmarks: data arguments, a cached trained CNN, interleaved timing.

Benchmarks are scripts (``python benchmarks/NAME.py``), so this module is imported by its name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from filelock import FileLock
from torch import nn

from kdcompress import data, models
from kdcompress.artifacts import WEIGHTS_FILE, OnnxModel, load_module, save_module
from kdcompress.stages.train import train


def mnist_arguments(parser: argparse.ArgumentParser, *, epochs: int, train_limit: int,
                    width: int) -> None:
    """The options every MNIST benchmark takes."""
    parser.add_argument("--data", default=os.environ.get(data.DATA_ENV),
                        help="folder with the four MNIST IDX files (or set KDCOMPRESS_DATA)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--train-limit", type=int, default=train_limit)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder to keep the trained model in, reused by later runs")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])


def trained_cnn(task: data.Task, width: int, epochs: int, cache: Path | None) -> nn.Module:
    """``models.cnn(width)`` trained on ``task``, loaded from ``cache`` when trained before."""
    folder = None if cache is None else cache / f"cnn-w{width}-e{epochs}-{task.fingerprint}"
    if folder is not None and (folder / WEIGHTS_FILE).exists():
        return load_module(folder)
    model = train(models.cnn(width=width), epochs=epochs, data=task)
    if folder is not None:
        save_module(model, folder)
    return model


def session(model: OnnxModel, threads: int) -> ort.InferenceSession:
    """A sequential ONNX Runtime CPU session with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])


def ort_runner(model: OnnxModel, x: np.ndarray, threads: int) -> Callable[[], object]:
    """A zero-argument callable running ``model`` on ``x``."""
    sess = session(model, threads)
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def side_by_side(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median latency (ms) of each zero-argument callable, timed side by side with the report's
    ruler (:func:`kdcompress.metrics.time_calls`: turns of consecutive runs, at least
    ``rounds`` timed runs each, after 5 warm-up runs)."""
    from kdcompress.metrics import MeasureConfig, time_calls

    config = MeasureConfig(warmup=5, repeats=rounds, min_seconds=0.0, max_repeats=rounds,
                           max_seconds=None)
    return {k: t["p50"] for k, t in zip(runners, time_calls(list(runners.values()), config),
                                        strict=True)}


def reproduction_arguments(parser: argparse.ArgumentParser, *, cache: str, epochs: int) -> None:
    """The options of the reproduction benchmarks (MNIST, resumable)."""
    parser.add_argument("--data", default=os.environ.get(data.DATA_ENV),
                        help="folder with the four MNIST IDX files (or set KDCOMPRESS_DATA)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--cache", type=Path, default=Path(cache))
    parser.add_argument("--train-limit", type=int, default=None,
                        help="first N training images only (a quick check, not the result)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch threads (default: every core; 1 lets two runs share two)")


def reproduction_setup(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       tag: str) -> tuple[data.Task, ResultCache]:
    """MNIST and the result cache ``CACHE/e<epochs>-<tag>[-n<limit>]``; ``--threads`` threads."""
    import torch

    if not args.data:
        parser.error("give --data DIR (the four MNIST IDX files) or set KDCOMPRESS_DATA")
    torch.set_num_threads(args.threads)
    task = data.mnist(args.data, train_limit=args.train_limit)
    limit = f"-n{args.train_limit}" if args.train_limit else ""
    return task, ResultCache(args.cache / f"e{args.epochs}-{tag}{limit}")


class ResultCache:
    """Trained models (``models/KEY``) and measured numbers (``results.json``) under one folder,
    both kept as soon as they exist, so a benchmark killed and run again redoes only what is
    missing. ``model(key, build)`` loads the model saved under ``key`` or builds and saves it,
    recording its training seconds in ``results["seconds"]``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.file = root / "results.json"
        self.results = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def model(self, key: str, build):
        folder = self.root / "models" / key
        if (folder / WEIGHTS_FILE).is_file():
            return load_module(folder)
        start = time.perf_counter()
        model = build()
        self.results.setdefault("seconds", {})[key] = round(time.perf_counter() - start, 1)
        self.save()
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        save_module(model, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process sharing the folder saved the same model first
            if not (folder / WEIGHTS_FILE).is_file():
                raise
            shutil.rmtree(tmp)
        return model

    def number(self, table: str, key: str, compute: Callable[[], Any]) -> Any:
        """``results[table][key]``, computed by ``compute()`` and saved the first time."""
        values = self.results.setdefault(table, {})
        if key not in values:
            values[key] = compute()
            self.save()
        return values[key]

    def save(self) -> None:
        """Write ``results.json``, first taking in what other processes sharing the folder wrote
        (theirs fill in what this one lacks), under a file lock, replacing the file atomically."""
        with FileLock(f"{self.file}.lock"):
            if self.file.is_file():
                _fill_in(self.results, json.loads(self.file.read_text()))
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
            tmp.replace(self.file)


def _fill_in(mine: dict, theirs: dict) -> None:
    """Add to ``mine``, in place, every key of ``theirs`` it lacks (recursively for dicts)."""
    for key, value in theirs.items():
        if key not in mine:
            mine[key] = value
        elif isinstance(mine[key], dict) and isinstance(value, dict):
            _fill_in(mine[key], value)
