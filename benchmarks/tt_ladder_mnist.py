"""Novikov et al. 2015 ("Tensorizing Neural Networks") on MNIST: a 1024x1024 hidden layer as a TT
layer at ranks 1-16 against a low-rank (SVD) matrix layer of the same parameter count.

Run by hand (it is not a test)::

    python benchmarks/tt_ladder_mnist.py --data DIR
    python benchmarks/tt_ladder_mnist.py --data DIR --epochs 1 --train-limit 2000   # a check

The network: the 28x28 image padded to 32x32 (1024 inputs), the hidden layer 1024 -> 1024,
ReLU, 1024 -> 10. The hidden layer is dense (the reference), a TT layer with modes
4x8x8x4 -> 4x8x8x4 at TT rank 1, 2, 4, 8, 16, or a product of two matrices of rank ``r``
(``kdcompress.layers.tensorize(method="svd")``) with ``r`` set so it has as many parameters as
the TT layer of each rank (at least rank 1: below 2,048 parameters no matrix layer exists).
Each is obtained two ways, with the same epochs and optimiser:

- **from scratch**: the factorised layer initialised from a random dense layer, then trained
  with cross-entropy;
- **decompose then distil**: TT-SVD / truncated SVD of the trained dense network's layer, then
  distilled from the dense network (``KD(temperature=4) * 0.9 + CE() * 0.1``).

Prints the compression factor of the hidden layer against test error (of 10,000) for every
variant, writes ``CACHE/tt_ladder.md`` and ``CACHE/tt_ladder.png``; trained models and numbers
stay in ``--cache`` so a re-run trains only what is missing. The paper's claim to check: at
equal parameters, TT beats the matrix-rank layer.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (  # benchmarks/common.py (scripts import it by name)
    reproduction_arguments,
    reproduction_setup,
)
from torch import nn

from kdcompress.context import StageContext
from kdcompress.layers import TTLinear, tensorize
from kdcompress.losses import CE, KD
from kdcompress.stages.distill import distill
from kdcompress.stages.train import train
from kdcompress.training import predict_logits

RANKS = (1, 2, 4, 8, 16)
MODES = (4, 8, 8, 4)
DENSE_PARAMS = 1024 * 1024


class Net(nn.Module):
    """Pad to 32x32, 1024 -> hidden -> ReLU -> 10."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(1024, 1024)
        self.out = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (2, 2, 2, 2)).flatten(1)
        return self.out(F.relu(self.hidden(x)))


def hidden_params(model: nn.Module) -> int:
    """Weights of the hidden layer (biases excluded, as in the paper's compression factor)."""
    layer = model.hidden
    if isinstance(layer, TTLinear):
        return layer.num_core_params()
    return sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))


def factorised(model: nn.Module, kind: str, rank: int) -> nn.Module:
    """A copy of ``model`` with its hidden layer as a TT layer of TT rank ``rank`` or a product
    of two matrices of rank ``rank``."""
    if kind == "tt":
        import copy

        out = copy.deepcopy(model)
        out.hidden = TTLinear.from_linear(model.hidden, rank=rank, in_modes=MODES,
                                          out_modes=MODES)
        return out
    out, _ = tensorize(model, layers="hidden", rank=rank, method="svd")
    return out


def variants() -> list[tuple[str, int]]:
    """(kind, rank): the TT ladder, then each matrix rank matching a TT rung's parameters."""
    matrix = sorted({max(1, round(tt_params(r) / 2048)) for r in RANKS})
    return [("tt", r) for r in RANKS] + [("svd", m) for m in matrix]


def tt_params(rank: int) -> int:
    ranks = (1,) + (rank,) * (len(MODES) - 1) + (1,)
    return sum(ranks[k] * MODES[k] * MODES[k] * ranks[k + 1] for k in range(len(MODES)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reproduction_arguments(parser, cache="runs/tt_ladder_mnist", epochs=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task, cache = reproduction_setup(parser, args, f"s{args.seed}")
    x_test, y_test = task.arrays("test")
    measured = cache.results.setdefault("errors", {})
    started = time.perf_counter()

    def ctx(name: str) -> StageContext:
        return StageContext.standalone(name, task, seed=args.seed)

    def errors(key: str, model_fn) -> int:
        def compute() -> int:
            model = model_fn()
            cache.results.setdefault("params", {})[key] = hidden_params(model)
            return int((predict_logits(model, x_test).argmax(1) != y_test).sum())
        return cache.number("errors", key, compute)

    dense = cache.model("dense", lambda: train(Net(args.seed), epochs=args.epochs,
                                               ctx=ctx("dense")))
    errors("dense", lambda: dense)
    for kind, rank in variants():
        errors(f"{kind}-r{rank}-scratch", lambda k=kind, r=rank: cache.model(
            f"{k}-r{r}-scratch", lambda: train(factorised(Net(args.seed), k, r),
                                               epochs=args.epochs, ctx=ctx("scratch"))))
        errors(f"{kind}-r{rank}-distilled", lambda k=kind, r=rank: cache.model(
            f"{k}-r{r}-distilled", lambda: distill(
                factorised(dense, k, r), dense, loss=KD(temperature=4) * 0.9 + CE() * 0.1,
                epochs=args.epochs, ctx=ctx("distilled"))))

    params = cache.results["params"]
    lines = [f"## TT ladder on MNIST ({len(task.split('train'))} training images, "
             f"{args.epochs} epochs, seed {args.seed})", "",
             f"Dense 1024x1024 hidden layer: {measured['dense']} test errors "
             f"({DENSE_PARAMS:,} weights).", "",
             "| hidden layer | weights | compression | errors, from scratch | "
             "errors, decompose + distil |", "|---|---:|---:|---:|---:|"]
    for kind, rank in variants():
        key = f"{kind}-r{rank}"
        n = params[f"{key}-scratch"]
        label = f"TT rank {rank}" if kind == "tt" else f"matrix rank {rank}"
        lines.append(f"| {label} | {n:,} | {DENSE_PARAMS / n:,.0f}x | "
                     f"{measured[f'{key}-scratch']} | {measured[f'{key}-distilled']} |")
    _plot(measured, params, cache.root / "tt_ladder.png")
    lines += ["", f"Plot: `{cache.root / 'tt_ladder.png'}`. This run "
              f"{(time.perf_counter() - started) / 60:.1f} min; training of every model "
              f"{sum(cache.results.get('seconds', {}).values()) / 60:.1f} min (load average "
              f"{os.getloadavg()[0]:.1f} at the end)."]
    text = "\n".join(lines) + "\n"
    (cache.root / "tt_ladder.md").write_text(text)
    print(text)


def _plot(measured: dict, params: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for kind, marker in (("tt", "o"), ("svd", "s")):
        for how, style in (("scratch", "-"), ("distilled", "--")):
            keys = [k for k in measured if k.startswith(f"{kind}-") and k.endswith(how)]
            points = sorted((DENSE_PARAMS / params[k], measured[k]) for k in keys)
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, linestyle=style,
                        label=f"{'TT' if kind == 'tt' else 'matrix rank'}, {how}")
    ax.axhline(measured["dense"], color="grey", linestyle=":", label="dense")
    ax.set_xscale("log")
    ax.set_yscale("log")  # matrix rank 1 errs 30x more than TT at the same size
    ax.set_xlabel("compression of the hidden layer (x)")
    ax.set_ylabel("test errors (of 10,000)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
