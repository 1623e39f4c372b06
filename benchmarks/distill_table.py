"""The same small student, trained alone and with each family of distillation loss (digits, or
MNIST with ``--data``: the CRD/RepDistiller-style table).

Two teachers are trained once with cross-entropy (a CNN and an MLP); the student, a CNN with 4
and 8 channels, is trained by the ``distill`` stage with each loss under the same optimiser,
epochs and seeds, so only the loss differs. "alone" is ``distill(loss=CE())``, the same loop
without a teacher. DKD appears twice: as the loss alone, and ramped up over its first epochs as
its reference code does (``Warmup(DKD(), epochs=3)``), since without the warm-up its non-target
term swamps a student that has not learnt the classes yet. Prints a markdown table of test
accuracy (mean and standard deviation over the seeds).

Usage::

    python benchmarks/distill_table.py [--seeds 3] [--epochs 20]         # digits, a few minutes
    python benchmarks/distill_table.py --data DIR [--epochs 10]          # MNIST, resumable

On MNIST every trained model and accuracy is kept in ``--cache`` (default
``runs/distill_table``), so a killed run resumes; a row whose difference from "student alone" is
under twice its standard error is marked "within noise".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ResultCache  # benchmarks/common.py (scripts import it by name)
from torch import nn

from kdcompress import data
from kdcompress.context import StageContext
from kdcompress.losses import AT, CE, DKD, KD, RKD, SP, FitNet, Warmup
from kdcompress.stages.distill import distill
from kdcompress.stages.train import train
from kdcompress.training import accuracy


class SmallCNN(nn.Module):
    """Two conv blocks (``block1``, ``block2``), an embedding (``embed``) and a classifier."""

    def __init__(self, width: int = 4, hidden: int = 16, classes: int = 10, side: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                                    nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1),
                                    nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (side // 2) ** 2, hidden),
                                   nn.ReLU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(self.block2(self.block1(x))))


class MLP(nn.Module):
    """A two-layer perceptron on the flattened image (the second, different teacher)."""

    def __init__(self, hidden: int = 256, classes: int = 10, side: int = 8) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(side * side, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def methods() -> dict[str, tuple[str, str, object]]:
    """Name -> (cache key, which teachers, loss). Feature and relation losses are added to CE, as
    in their papers' classification experiments. The keys only name cached results: a row keeps
    its key when rows are added."""
    return {
        "student alone (CE)": ("m0", "none", CE()),
        "KD (T=4)": ("m1", "cnn", KD(temperature=4) * 0.9 + CE() * 0.1),
        "DKD (alpha=1, beta=8), no warm-up": ("m2", "cnn", DKD() + CE()),
        "DKD (alpha=1, beta=8), 3-epoch warm-up": ("m8", "cnn", Warmup(DKD(), epochs=3) + CE()),
        "FitNet (embed, MSE)": ("m3", "cnn", FitNet("embed", "embed") + CE()),
        "AT (block2)": ("m4", "cnn", AT("block2", "block2") * 500 + CE()),
        "RKD (embed, D+A)": ("m5", "cnn", RKD("embed", "embed") + CE()),
        "SP (embed)": ("m6", "cnn", SP("embed", "embed") * 100 + CE()),
        "KD, 2 teachers (confidence)": ("m7", "both", KD(temperature=4) * 0.9 + CE() * 0.1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--data", default=None,
                        help="MNIST folder (the four IDX files); digits when not given")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/distill_table"))
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = data.mnist(args.data, train_limit=args.train_limit) if args.data else data.digits()
    side = task.input_shape[-1]
    limit = f"-n{args.train_limit}" if args.train_limit else ""
    cache = ResultCache(args.cache / f"{task.name}-e{args.epochs}-lr{args.lr:g}{limit}")
    start = time.perf_counter()

    def scored(key: str, build) -> float:
        return cache.number("accuracy", key,
                            lambda: accuracy(cache.model(key, build), task, "test"))

    teachers = {
        "cnn": cache.model("teacher-cnn", lambda: train(
            SmallCNN(width=16, hidden=128, side=side), epochs=20, data=task)),
        "mlp": cache.model("teacher-mlp", lambda: train(MLP(side=side), epochs=20, data=task)),
    }
    rows = [(f"teacher CNN ({_params(teachers['cnn'])} params)",
             [scored("teacher-cnn", lambda: teachers["cnn"])]),
            (f"teacher MLP ({_params(teachers['mlp'])} params)",
             [scored("teacher-mlp", lambda: teachers["mlp"])])]
    for name, (key, which, loss) in methods().items():
        teacher = {"none": None, "cnn": teachers["cnn"],
                   "both": [teachers["cnn"], teachers["mlp"]]}[which]
        accs = []
        for seed in range(args.seeds):
            def build(seed=seed, teacher=teacher, loss=loss):
                ctx = StageContext.standalone("student", task, seed=seed)
                torch.manual_seed(seed)
                return distill(SmallCNN(side=side), teacher, loss=loss, epochs=args.epochs,
                               lr=args.lr, teacher_weighting="confidence", ctx=ctx)
            accs.append(scored(f"{key}-s{seed}", build))
        rows.append((name, accs))
        print(f"{name}: {accs} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    size = f"{len(task.split('train'))} training images" if args.data else "1797 8x8 images"
    print(f"{task.name} ({size}; {len(task.split('test'))} test), student SmallCNN "
          f"({_params(SmallCNN(side=side))} params), {args.epochs} epochs, lr {args.lr}, "
          f"batch 64, seeds 0..{args.seeds - 1}; this run {time.perf_counter() - start:.0f} s, "
          f"training of every model {sum(cache.results.get('seconds', {}).values()):.0f} s\n")
    alone = rows[2][1]
    print("| model / loss | test accuracy (%) | std | vs student alone |")
    print("|---|---:|---:|---|")
    for name, accs in rows:
        std = statistics.stdev(accs) * 100 if len(accs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(accs) * 100:.2f} | {std:.2f} | "
              f"{_versus(accs, alone) if accs is not alone and len(accs) > 1 else ''} |")


def _versus(accs: list[float], alone: list[float]) -> str:
    """The difference in points, "within noise" under twice its standard error."""
    diff = 100 * (statistics.mean(accs) - statistics.mean(alone))
    error = 100 * (statistics.variance(accs) / len(accs)
                   + statistics.variance(alone) / len(alone)) ** 0.5
    return f"{diff:+.2f}" + (" (within noise)" if abs(diff) < 2 * error else "")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
