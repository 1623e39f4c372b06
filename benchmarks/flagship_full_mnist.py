"""The flagship pipeline on all of MNIST (55,000 training images), its wall time, and how far its
training runs from this machine's throughput limit for the same MACs.

Run by hand (it is not a test)::

    python benchmarks/flagship_full_mnist.py --data DIR

The pipeline is pipelines/tt_distill_quant.py unchanged (teacher 20 epochs, distillation 15 with
the teacher's outputs computed once and cached, pruning with 5 recovery epochs, ONNX, int8),
run in ``--out`` (default ``runs/flagship_full_mnist``): a killed run resumes from the stages
already done, and a finished one is only re-measured. Then, on the same machine and in the same
process:

- **plain loop**: the teacher's training step (forward, backward, AdamW) over tensors already in
  memory, batch 64, no validation, no checks: the most a training loop could do here;
- **GEMM limit**: the training step's multiply-adds (3x the forward MACs) at the float32 matrix
  multiply rate of this CPU (``torch.mm`` of 1024x1024 matrices, all threads), i.e. samples per
  second if every MAC ran at peak.

It prints the report table, every stage's seconds, and the teacher's training throughput
against both.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcompress import data, models
from kdcompress.cli import load_pipeline
from kdcompress.metrics import count_macs
from kdcompress.options import RunOptions
from kdcompress.runner import run
from kdcompress.training import FitConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(task: data.Task, seconds: float = 20.0) -> float:
    """Training samples per second of the bare step for models.cnn(width=64), batch 64."""
    torch.manual_seed(0)
    x, y = task.arrays("train")
    model = models.cnn(width=64).build(task.input_shape, task.num_classes).train()
    optimizer, _ = make_optimizer(list(model.parameters()), FitConfig(), total_steps=10**6)
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(x) - 64, 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += 64
            if time.perf_counter() - start >= seconds:
                break
    return seen / (time.perf_counter() - start)


def gemm_rate(seconds: float = 5.0) -> float:
    """Float32 multiply-adds per second of torch.mm on 1024x1024 matrices."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 1024**3 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(data.DATA_ENV),
                        help="folder with the four MNIST IDX files (or set KDCOMPRESS_DATA)")
    parser.add_argument("--out", type=Path, default=Path("runs/flagship_full_mnist"))
    parser.add_argument("--train-limit", type=int, default=None,
                        help="first N training images only (a quick check, not the result)")
    args = parser.parse_args()
    if not args.data:
        parser.error("give --data DIR (the four MNIST IDX files) or set KDCOMPRESS_DATA")
    task = data.mnist(args.data, train_limit=args.train_limit)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    report = run(load_pipeline(ROOT / "pipelines" / "tt_distill_quant.py"),
                 RunOptions(out=args.out, data=task))
    wall = time.perf_counter() - start
    computed = sum(r.seconds for r in report.stages)
    teacher = report.row("teacher")
    epochs = len(teacher.details.get("history", [])) or 20
    n = len(task.split("train"))
    steps = n // 64
    staged = epochs * steps * 64 / teacher.seconds if teacher.seconds else float("nan")

    torch.set_num_threads(os.cpu_count() or 1)
    plain = plain_loop(task)
    model = models.cnn(width=64).build(task.input_shape, task.num_classes)
    macs = count_macs(model, task.arrays("train")[0][:1]) or 0
    rate = gemm_rate()
    limit = rate / (3 * macs)

    print(f"## The flagship on all of MNIST ({n} training images)\n")
    print(f"`python benchmarks/flagship_full_mnist.py --data DIR`; this run {wall / 60:.1f} min "
          f"wall ({'from the cache' if all(r.cached for r in report.stages) else 'computed'}); "
          f"the stages' own seconds sum to {computed / 60:.1f} min; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n")
    print("| stage | seconds | params | size | val acc | test acc | b1 ms | b64 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in report.stages:
        lat = r.latency_ms
        print(f"| {r.name} | {r.seconds:.0f} | {r.params:,} | {r.size_bytes / 1024:.1f} KiB | "
              f"{r.val_accuracy} | {r.accuracy} | {lat['batch_1']['p50']} | "
              f"{lat['batch_64']['p50']} |")
    print(f"\nTeacher training ({epochs} epochs, validation after each): {staged:,.0f} "
          f"samples/s. Plain loop (same model and step, batch 64, data in memory, no "
          f"validation): {plain:,.0f} samples/s ({staged / plain:.0%} of it). GEMM limit: "
          f"{macs:,} forward MACs x 3 per training sample at {rate / 1e9:.1f} GMAC/s = "
          f"{limit:,.0f} samples/s ({staged / limit:.0%} of it).")


if __name__ == "__main__":
    main()
