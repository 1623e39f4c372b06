"""The same small student on digits, trained alone and with each family of distillation loss.

Two teachers are trained once with cross-entropy (a CNN and an MLP); the student, a CNN with 4
and 8 channels, is trained by the ``distill`` stage with each loss under the same optimiser,
epochs and seeds, so only the loss differs. "alone" is ``distill(loss=CE())``, the same loop
without a teacher. Prints a markdown table of test accuracy (mean and standard deviation over
the seeds).

Usage: ``python benchmarks/distill_table.py [--seeds 3] [--epochs 20]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from kdcompress import data
from kdcompress.context import StageContext
from kdcompress.losses import AT, CE, DKD, KD, RKD, SP, FitNet
from kdcompress.stages.distill import distill
from kdcompress.stages.train import train
from kdcompress.training import accuracy


class SmallCNN(nn.Module):
    """Two conv blocks (``block1``, ``block2``), an embedding (``embed``) and a classifier."""

    def __init__(self, width: int = 4, hidden: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                                    nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1),
                                    nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(self.block2(self.block1(x))))


class MLP(nn.Module):
    """A two-layer perceptron on the flattened image (the second, different teacher)."""

    def __init__(self, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def methods() -> dict[str, tuple[str, object]]:
    """Name -> (which teachers, loss). Feature and relation losses are added to CE, as in their
    papers' classification experiments."""
    return {
        "student alone (CE)": ("none", CE()),
        "KD (T=4)": ("cnn", KD(temperature=4) * 0.9 + CE() * 0.1),
        "DKD (alpha=1, beta=8)": ("cnn", DKD() + CE()),
        "FitNet (embed, MSE)": ("cnn", FitNet("embed", "embed") + CE()),
        "AT (block2)": ("cnn", AT("block2", "block2") * 500 + CE()),
        "RKD (embed, D+A)": ("cnn", RKD("embed", "embed") + CE()),
        "SP (embed)": ("cnn", SP("embed", "embed") * 100 + CE()),
        "KD, 2 teachers (confidence)": ("both", KD(temperature=4) * 0.9 + CE() * 0.1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    task = data.digits()
    start = time.perf_counter()
    teachers = {
        "cnn": train(SmallCNN(width=16, hidden=128), epochs=20, data=task),
        "mlp": train(MLP(), epochs=20, data=task),
    }
    rows = [(f"teacher CNN ({_params(teachers['cnn'])} params)",
             [accuracy(teachers["cnn"], task, "test")]),
            (f"teacher MLP ({_params(teachers['mlp'])} params)",
             [accuracy(teachers["mlp"], task, "test")])]
    for name, (which, loss) in methods().items():
        teacher = {"none": None, "cnn": teachers["cnn"],
                   "both": [teachers["cnn"], teachers["mlp"]]}[which]
        accs = []
        for seed in range(args.seeds):
            ctx = StageContext.standalone("student", task, seed=seed)
            torch.manual_seed(seed)
            student = SmallCNN()
            out = distill(student, teacher, loss=loss, epochs=args.epochs, lr=args.lr,
                          teacher_weighting="confidence", ctx=ctx)
            accs.append(accuracy(out, task, "test"))
        rows.append((name, accs))
        print(f"{name}: {accs} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"digits (1797 8x8 images; {len(task.split('test'))} test), student SmallCNN "
          f"({_params(SmallCNN())} params), {args.epochs} epochs, lr {args.lr}, batch 64, "
          f"seeds 0..{args.seeds - 1}, {time.perf_counter() - start:.0f} s\n")
    print("| model / loss | test accuracy (%) | std |")
    print("|---|---:|---:|")
    for name, accs in rows:
        std = statistics.stdev(accs) * 100 if len(accs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(accs) * 100:.2f} | {std:.2f} |")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
