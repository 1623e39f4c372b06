"""Per-layer sensitivity of the MNIST flagship teacher: every layer and setting, timed.

The teacher is ``models.cnn(width=64)`` trained 20 epochs on the first 20,000 MNIST training
images (benchmarks/common.py's cached ``trained_cnn``, or ``--teacher DIR``: the flagship run's
``stages/teacher/<fingerprint>`` folder). Every Conv2d and Linear layer gets a TT
cell per rank, every torch-pruning group a prune cell per ratio, every quantizable ONNX node an
int8 cell; all on the first 1000 validation images. Prints the wall time (with the load average)
and writes sensitivity.json / .md / .png.

    python benchmarks/sensitivity_mnist.py --data /work/shared/data/mnist \\
        --cache /work/runs_bench_cache --out runs/bench/sensitivity_mnist

``--full`` also times the same cells evaluated with a full forward pass each (the brute force
the incremental evaluation replaces). A tiny check: ``--data digits --epochs 1 --width 8``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import mnist_arguments, trained_cnn  # noqa: E402

from kdcompress import data  # noqa: E402
from kdcompress.analysis import sensitivity  # noqa: E402
from kdcompress.analysis.files import markdown  # noqa: E402
from kdcompress.artifacts import load_module  # noqa: E402


def _task(args: argparse.Namespace) -> data.Task:
    if args.data == "digits":
        return data.digits()
    if not args.data:
        sys.exit("give --data DIR with the MNIST IDX files (or set KDCOMPRESS_DATA)")
    return data.limit_train(data.mnist(args.data), args.train_limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mnist_arguments(parser, epochs=20, train_limit=20000, width=64)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7])
    parser.add_argument("--no-int8", action="store_true", help="leave the int8 cells out")
    parser.add_argument("--full", action="store_true",
                        help="also time the brute force: a full forward pass per cell")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/sensitivity_mnist"))
    parser.add_argument("--teacher", type=Path, metavar="DIR",
                        help="a saved teacher (a run folder's stages/teacher/...) instead of "
                        "the cached trained_cnn")
    args = parser.parse_args()

    task = _task(args)
    teacher = (load_module(args.teacher) if args.teacher
               else trained_cnn(task, args.width, args.epochs, args.cache))
    int8 = not args.no_int8 and importlib.util.find_spec("kdcompress.analysis.int8") is not None
    kwargs = {"kinds": ("tt", "prune"), "ranks": args.ranks, "ratios": args.ratios,
              "layers": [nn.Conv2d, nn.Linear], "samples": args.samples, "int8": int8}
    start = time.perf_counter()
    result = sensitivity(teacher, task, **kwargs)
    seconds = time.perf_counter() - start
    load = os.getloadavg()
    paths = result.save(args.out)
    print(markdown(result))
    counts = {k: sum(c.kind == k for c in result.cells) for k in result.kinds()}
    print(f"{task.name} teacher {type(teacher).__name__}: {len(result.cells)} cells {counts} on "
          f"{result.samples} validation samples in {seconds:.1f} s wall "
          f"({'incremental' if result.incremental else 'full forward passes'}); load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    if args.full:
        start = time.perf_counter()
        full = sensitivity(teacher, task, incremental=False, **{**kwargs, "int8": False})
        brute = time.perf_counter() - start
        torch_cells = sum(c.kind != "int8" for c in result.cells)
        print(f"brute force (a full forward pass per cell, int8 left out): {len(full.cells)} "
              f"cells in {brute:.1f} s; load average {os.getloadavg()[0]:.2f}; "
              f"incremental torch cells: {torch_cells}")
    print("files:", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
