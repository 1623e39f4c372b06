"""Structured pruning of 50% of the channels against latency, on a CNN trained on MNIST.

    python benchmarks/bench_prune.py --data /work/shared/data/mnist
    python benchmarks/bench_prune.py --data DIR --ratio 0.5 --recovery-epochs 1

Trains ``models.cnn(width=...)`` for a few epochs, prunes it with the ``prune`` stage
(``ratio`` of the channels of every layer but the classifier head, L2 magnitude, optionally
followed by KD recovery from the unpruned model), and measures both models side by side in one
process: PyTorch eager and ONNX Runtime fp32 (both exported with ``export_onnx``), batch 1 and 64,
1 and 2 threads, runs interleaved round by round and medians compared. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch_pruning as tp
from common import mnist_arguments, ort_runner, side_by_side, trained_cnn
from torch import nn

from kdcompress import data
from kdcompress.stages.export import export_onnx
from kdcompress.stages.prune import prune
from kdcompress.training import accuracy


def torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description="50% channel pruning vs latency on MNIST")
    mnist_arguments(parser, epochs=2, train_limit=20000, width=32)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--recovery-epochs", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(max(args.threads))
    task = data.mnist(args.data, train_limit=args.train_limit)
    start = time.perf_counter()
    dense = trained_cnn(task, args.width, args.epochs, args.cache)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    pruned = prune(dense, ratio=args.ratio, recovery_epochs=args.recovery_epochs, data=task)
    prune_s = time.perf_counter() - start
    onnx_models = {"dense": export_onnx(dense, data=task), "pruned": export_onnx(pruned, data=task)}

    example = task.example(1)
    print(f"\nModel: models.cnn(width={args.width}) on MNIST, {args.epochs} epochs on "
          f"{len(task.train)} images ({train_s:.0f} s); prune(ratio={args.ratio}, "
          f"recovery_epochs={args.recovery_epochs}) ({prune_s:.0f} s)\n")
    print("| model | conv channels | params | MACs | test top-1 |")
    print("|---|---|---|---|---|")
    for name, m in (("dense", dense), ("pruned", pruned)):
        macs, params = tp.utils.count_ops_and_params(m, example)
        channels = "/".join(str(c.out_channels) for c in m.modules() if isinstance(c, nn.Conv2d))
        print(f"| {name} | {channels} | {params / 1e3:.1f}k | {macs / 1e6:.2f}M | "
              f"{100 * accuracy(m, task, 'test'):.2f}% |")

    x_all = task.calibration(max(args.batches), seed=1)
    print("\n| engine | batch | threads | dense ms | pruned ms | speedup |")
    print("|---|---|---|---|---|---|")
    for engine in ("pytorch", "onnxruntime"):
        for batch in args.batches:
            for threads in args.threads:
                x = x_all[:batch]
                if engine == "pytorch":
                    torch.set_num_threads(threads)
                    runners = {"dense": torch_runner(dense, x), "pruned": torch_runner(pruned, x)}
                else:
                    runners = {k: ort_runner(m, x.numpy(), threads)
                               for k, m in onnx_models.items()}
                t = side_by_side(runners, args.rounds)
                print(f"| {engine} | {batch} | {threads} | {t['dense']:.3f} | {t['pruned']:.3f} | "
                      f"{t['dense'] / t['pruned']:.2f}x |")
    print(f"\nmedians of {args.rounds} interleaved runs after 5 warm-up runs")


if __name__ == "__main__":
    main()
