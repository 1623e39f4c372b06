"""The same ruler for every artifact: size, MACs, latency, accuracy, agreement.

Latency is measured with warm-up, a fixed thread count, and real test inputs; medians and 90th
percentiles are reported in milliseconds. PyTorch runs torch models, ONNX Runtime runs ONNX ones,
and the row names the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcompress.artifacts import RECIPE_FILE, WEIGHTS_FILE, OnnxModel, num_params
from kdcompress.data import Task
from kdcompress.training import predict_logits

__all__ = ["MeasureConfig", "measure", "latency", "predict", "count_macs", "time_call"]


@dataclass(frozen=True)
class MeasureConfig:
    """How artifacts are measured.

    Attributes
    ----------
    threads : int
        Intra-op threads for PyTorch and ONNX Runtime while timing.
    batch_sizes : tuple of int
        Batch sizes timed (the report's ``batch_1`` and ``batch_64``).
    warmup : int
        Untimed runs before timing.
    repeats : int
        Timed runs per batch size (at least; short runs are repeated up to ``min_seconds``).
    min_seconds : float
        Keep timing a batch size until this much time has passed, up to ``max_repeats``.
    cuda : bool
        Also time torch models on the GPU.
    """

    threads: int = 1
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 5
    repeats: int = 20
    min_seconds: float = 0.2
    max_repeats: int = 200
    cuda: bool = False


def predict(
    model: nn.Module | OnnxModel, x: torch.Tensor, *, batch_size: int = 512
) -> torch.Tensor:
    """Logits of a torch or ONNX model on ``x`` (CPU)."""
    if isinstance(model, OnnxModel):
        return torch.cat([model.predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return predict_logits(model, x, batch_size=batch_size)


def _batch(x: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:n].contiguous()


def time_call(fn: Callable[[], Any], config: MeasureConfig | None = None,
              sync: Callable[[], None] = lambda: None) -> dict:
    """Time ``fn()`` after warm-up: ``{"p50", "p90"}`` in milliseconds and the number of runs."""
    config = config or MeasureConfig()
    for _ in range(config.warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < config.repeats or (
            time.perf_counter() - start < config.min_seconds and len(times) < config.max_repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": round(float(np.percentile(times, 50)), 4),
            "p90": round(float(np.percentile(times, 90)), 4), "runs": len(times)}


def latency(model: nn.Module | OnnxModel, x: torch.Tensor, config: MeasureConfig,
            device: str = "cpu") -> dict[str, dict]:
    """Latency in ms per batch size: ``{"batch_1": {"p50", "p90", "runs"}, ...}``."""
    out: dict[str, dict] = {}
    if isinstance(model, OnnxModel):
        session = model.session(device, config.threads)
        name = session.get_inputs()[0].name
        for b in config.batch_sizes:
            feed = {name: _batch(x, b).numpy()}
            out[f"batch_{b}"] = time_call(lambda feed=feed: session.run(None, feed), config)
        return out
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        model = model.to(device).eval()
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        with torch.inference_mode():
            for b in config.batch_sizes:
                xb = _batch(x, b).to(device)
                out[f"batch_{b}"] = time_call(lambda xb=xb: model(xb), config, sync)
    finally:
        torch.set_num_threads(previous)
        model.to("cpu")
    return out


def count_macs(model: nn.Module, example: torch.Tensor) -> int | None:
    """Multiply-accumulates of one forward pass on ``example`` (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(example)
        return int(counter.get_total_flops() // 2)
    except Exception:  # an op the counter does not know: report no number rather than a wrong one
        return None


def _torch_size(folder: Path | None, model: nn.Module) -> int:
    if folder is not None and (folder / WEIGHTS_FILE).is_file():
        return sum((folder / f).stat().st_size for f in (WEIGHTS_FILE, RECIPE_FILE)
                   if (folder / f).is_file())
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure(model: nn.Module | OnnxModel, task: Task, *, config: MeasureConfig | None = None,
            folder: Path | None = None, reference: torch.Tensor | None = None) -> dict[str, Any]:
    """Measure one artifact: params, size on disk, MACs, latency, accuracy, agreement.

    Parameters
    ----------
    model : nn.Module or OnnxModel
        The artifact.
    task : Task
        Its data: test inputs are timed and scored.
    folder : Path, optional
        Where a torch artifact is saved (its size on disk); ONNX sizes come from the file.
    reference : Tensor, optional
        The baseline's predicted classes on the test split, for ``agreement``.
    """
    config = config or MeasureConfig()
    x, y = task.arrays("test")
    onnx = isinstance(model, OnnxModel)
    preds = predict(model, x).argmax(1)
    row: dict[str, Any] = {
        "params": num_params(model),
        "size_bytes": model.size_bytes if onnx else _torch_size(folder, model),
        "macs": None if onnx else count_macs(model, x[:1]),
        "latency_ms": latency(model, x, config),
        "engine": "onnxruntime" if onnx else "torch",
        "accuracy": round(float((preds == y).float().mean()), 6),
        "agreement": None if reference is None
        else round(float((preds == reference).float().mean()), 6),
    }
    if config.cuda:
        row["latency_ms_cuda"] = latency(model, x, config, device="cuda") if not onnx else None
    return row
