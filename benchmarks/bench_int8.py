"""ONNX Runtime int8 (static QDQ) against fp32 on a CNN trained on MNIST: speed and accuracy.

    python benchmarks/bench_int8.py --data /work/shared/data/mnist
    python benchmarks/bench_int8.py --data DIR --epochs 3 --width 64 --rounds 60

Trains ``models.cnn(width=...)`` for a few epochs (``--train-limit`` images), exports it with
``export_onnx`` and quantizes it with ``quantize_onnx`` (static QDQ, S8S8, per-channel, MinMax
calibration on 256 training images; also per-tensor and Entropy / Percentile variants). Latency is
measured side by side in one process: for each batch size and thread count, fp32 and int8
sessions are run in alternation (``--rounds`` rounds after warm-up) and the medians compared, so
load from other processes hits both alike. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import mnist_arguments, ort_runner, session, side_by_side, trained_cnn

import kdcompress.stages.quantize as quantize_module
from kdcompress import data
from kdcompress.artifacts import OnnxModel
from kdcompress.context import StageContext
from kdcompress.stages.export import export_onnx
from kdcompress.stages.quantize import cpu_int8_features, quantize_onnx


def interleaved(models_: dict[str, OnnxModel], x: np.ndarray, threads: int, rounds: int
                ) -> dict[str, float]:
    """Median latency (ms) of each model on ``x``, runs interleaved round by round."""
    return side_by_side({k: ort_runner(m, x, threads) for k, m in models_.items()}, rounds)


def top1(model: OnnxModel, task: data.Task) -> float:
    x, y = task.arrays("test")
    sess = session(model, 2)
    name = sess.get_inputs()[0].name
    array = x.numpy()
    pred = np.concatenate([sess.run(None, {name: array[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(array), 500)])
    return float((pred == y.numpy()).mean())


def quantized(fp32: OnnxModel, task: data.Task, root: Path, name: str, **kwargs) -> OnnxModel:
    ctx = StageContext.standalone(name, task)
    ctx.workdir = root / name
    return quantize_onnx(fp32, ctx=ctx, **kwargs)


def quantized_all_convs(fp32: OnnxModel, task: data.Task, root: Path) -> OnnxModel:
    """int8 with the first conv quantized too (the stage keeps tiny-reduction convs in fp32)."""
    saved = quantize_module._MIN_CONV_REDUCTION
    quantize_module._MIN_CONV_REDUCTION = 0
    try:
        return quantized(fp32, task, root, "all_convs")
    finally:
        quantize_module._MIN_CONV_REDUCTION = saved


def main() -> None:
    parser = argparse.ArgumentParser(description="int8 vs fp32 with ONNX Runtime on MNIST")
    mnist_arguments(parser, epochs=1, train_limit=12000, width=64)
    args = parser.parse_args()

    torch.set_num_threads(max(args.threads))
    task = data.mnist(args.data, train_limit=args.train_limit)
    start = time.perf_counter()
    model = trained_cnn(task, args.width, args.epochs, args.cache)
    train_s = time.perf_counter() - start
    root = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    ctx = StageContext.standalone("fp32", task)
    ctx.workdir = root / "fp32"
    fp32 = export_onnx(model, ctx=ctx)
    variants = {
        "int8": quantized(fp32, task, root, "int8"),
        "int8 per-tensor": quantized(fp32, task, root, "per_tensor", per_channel=False),
        "int8 all convs": quantized_all_convs(fp32, task, root),
        "int8 entropy": quantized(fp32, task, root, "entropy", calibration="entropy"),
        "int8 percentile": quantized(fp32, task, root, "percentile", calibration="percentile"),
    }

    print(f"\nCPU: {platform.processor() or platform.machine()}, int8 instructions: "
          f"{', '.join(cpu_int8_features()) or 'none'}; onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}")
    print(f"Model: models.cnn(width={args.width}) on MNIST, {args.epochs} epochs on "
          f"{len(task.train)} images ({train_s:.0f} s)\n")
    acc32 = top1(fp32, task)
    print("| model | size KiB | test top-1 | change (points) |")
    print("|---|---|---|---|")
    print(f"| fp32 | {fp32.size_bytes / 1024:.1f} | {100 * acc32:.2f}% | - |")
    for name, m in variants.items():
        acc = top1(m, task)
        print(f"| {name} | {m.size_bytes / 1024:.1f} | {100 * acc:.2f}% | "
              f"{100 * (acc - acc32):+.2f} |")

    x_all = task.calibration(max(args.batches), seed=1).numpy()
    columns = {"int8": "int8", "int8 all convs": "all convs", "int8 per-tensor": "per-tensor"}
    print("\n| batch | threads | fp32 ms | " + " | ".join(f"{c} ms | speedup" for c in
                                                    columns.values()) + " |")
    print("|---|---|---|" + "---|---|" * len(columns))
    for batch in args.batches:
        for threads in args.threads:
            t = interleaved({"fp32": fp32, **{k: variants[k] for k in columns}},
                             x_all[:batch], threads, args.rounds)
            cells = " | ".join(f"{t[k]:.3f} | {t['fp32'] / t[k]:.2f}x" for k in columns)
            print(f"| {batch} | {threads} | {t['fp32']:.3f} | {cells} |")
    print(f"\nmedians of {args.rounds} interleaved runs after 5 warm-up runs; graphs in {root}")


if __name__ == "__main__":
    main()
