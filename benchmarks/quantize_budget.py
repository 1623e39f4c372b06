"""quantize_onnx(max_drop=...) against full int8 and fp32 on the MNIST flagship teacher.

    python benchmarks/quantize_budget.py --data /work/shared/data/mnist \\
        --cache /work/runs_bench_cache
    python benchmarks/quantize_budget.py --data DIR --train-limit 2000 --epochs 1 --width 16
    python benchmarks/quantize_budget.py --data DIR --teacher RUN/stages/teacher/FINGERPRINT

The fp32 parent is ``models.cnn(width=64)`` trained 20 epochs on the first 20,000 training images
(the cached teacher of the other MNIST benchmarks with ``--cache``), exported with
``export_onnx``. It is quantized with the stage's static defaults (QDQ, S8S8, per-channel, MinMax
on 256 training images) once fully and once per ``--max-drop`` budget. For each graph: validation
and test accuracy, and batch-1 / batch-64 latency with one thread, all graphs' sessions run in
alternation (``--rounds`` rounds after warm-up) so load from other processes hits them alike; the
share of full int8's speed-up a budgeted graph keeps is ``(fp32 - budgeted) / (fp32 - int8)``.
A budget is met when the graph's validation accuracy is within ``max_drop`` points of fp32's.
Prints markdown tables and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import mnist_arguments, ort_runner, side_by_side, trained_cnn

from kdcompress import data
from kdcompress.artifacts import OnnxModel, load_module
from kdcompress.context import StageContext
from kdcompress.stages.export import export_onnx
from kdcompress.stages.quantize import cpu_int8_features, quantize_onnx


def top1(model: OnnxModel, task: data.Task, split: str) -> float:
    x, y = task.arrays(split)
    pred = np.concatenate([model.predict(x[i:i + 500]).argmax(1).numpy()
                           for i in range(0, len(x), 500)])
    return float((pred == y.numpy()).mean())


def quantized(fp32: OnnxModel, task: data.Task, root: Path, name: str,
              **kwargs) -> tuple[OnnxModel, StageContext, float]:
    ctx = StageContext.standalone(name, task)
    ctx.workdir = root / name
    start = time.perf_counter()
    graph = quantize_onnx(fp32, ctx=ctx, **kwargs)
    return graph, ctx, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="quantize_onnx(max_drop=) on MNIST")
    mnist_arguments(parser, epochs=20, train_limit=20000, width=64)
    parser.add_argument("--max-drop", type=float, nargs="+", default=[0.3, 0.0],
                        help="budgets in validation accuracy points")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a saved torch artifact folder to use as the fp32 parent instead "
                             "(e.g. a run's stages/teacher/<fingerprint>)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    task = data.limit_train(data.mnist(args.data), args.train_limit)
    start = time.perf_counter()
    model = load_module(args.teacher) if args.teacher else \
        trained_cnn(task, args.width, args.epochs, args.cache)
    train_s = time.perf_counter() - start
    root = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    ctx = StageContext.standalone("fp32", task)
    ctx.workdir = root / "fp32"
    fp32 = export_onnx(model, ctx=ctx)

    graphs: dict[str, OnnxModel] = {"fp32": fp32}
    contexts: dict[str, StageContext] = {}
    seconds: dict[str, float] = {}
    graphs["int8"], contexts["int8"], seconds["int8"] = quantized(fp32, task, root, "int8")
    for budget in args.max_drop:
        name = f"max_drop={budget:g}"
        graphs[name], contexts[name], seconds[name] = quantized(
            fp32, task, root, f"budget_{budget:g}", max_drop=budget)

    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, int8 "
          f"instructions: {', '.join(cpu_int8_features()) or 'none'}; onnxruntime "
          f"{ort.__version__}, torch {torch.__version__}")
    source = args.teacher or f"models.cnn(width={args.width}), {args.epochs} epochs"
    print(f"fp32 parent: {source}, on {len(task.train)} MNIST images (loaded or trained in "
          f"{train_s:.0f} s)\n")

    val = {k: top1(g, task, "val") for k, g in graphs.items()}
    test = {k: top1(g, task, "test") for k, g in graphs.items()}
    print("| graph | val top-1 | val drop (points) | test top-1 | budget met | nodes back to "
          "fp32 (alone cost, points) | stage s |")
    print("|---|---|---|---|---|---|---|")
    for k in graphs:
        drop = 100 * (val["fp32"] - val[k])
        details = contexts[k].details if k in contexts else {}
        budget = details.get("max_drop")
        met = "-" if budget is None else ("yes" if drop <= budget + 1e-9 else "NO")
        back = ", ".join(f"{r['node']} ({r['drop']:.2f})" for r in details.get("reverted", []))
        print(f"| {k} | {100 * val[k]:.2f}% | {drop:+.2f} | {100 * test[k]:.2f}% | {met} | "
              f"{back or '-'} | {seconds.get(k, 0):.1f} |")

    load_before = os.getloadavg()[0]
    x_all = task.calibration(max(args.batches), seed=1).numpy()
    names = [k for k in graphs if k not in ("fp32", "int8")]
    print("\n| batch | fp32 ms | int8 ms | int8 speed-up | "
          + " | ".join(f"{k} ms | share of int8's speed-up kept" for k in names) + " |")
    print("|---|---|---|---|" + "---|---|" * len(names))
    for batch in args.batches:
        t = side_by_side({k: ort_runner(g, x_all[:batch], 1) for k, g in graphs.items()},
                         args.rounds)
        gain = t["fp32"] - t["int8"]
        cells = " | ".join(f"{t[k]:.3f} | " + (f"{100 * (t['fp32'] - t[k]) / gain:.0f}%"
                                                if gain > 0 else "- (int8 not faster)")
                           for k in names)
        print(f"| {batch} | {t['fp32']:.3f} | {t['int8']:.3f} | {t['fp32'] / t['int8']:.2f}x | "
              f"{cells} |")
    print(f"\none thread; medians of {args.rounds} interleaved rounds after 5 warm-up runs; load "
          f"average {load_before:.2f} before timing, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} cores); graphs in {root}")
    for k in names:
        d = contexts[k].details
        costs = ", ".join(f"{c['node']} {c['drop']:+.2f}" for c in d.get("node_costs", []))
        print(f"{k}: full int8 val {100 * d['val_accuracy_int8']:.2f}% vs fp32 "
              f"{100 * d['val_accuracy_fp32']:.2f}% on {d['val_samples']} images; node costs "
              f"alone: {costs or 'not needed'}; calibration passes: "
              f"{d['calibration_passes']}; warnings: {contexts[k].warnings or 'none'}")


if __name__ == "__main__":
    main()
