"""Speed of TTLinear against nn.Linear, the reconstructed-weight forward, and tensorly-torch.

Run by hand::

    python benchmarks/bench_tt.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_tt.py --quick    # fewer repeats

For a 784x512 and a 1024x1024 layer at 5x, 20x, 100x and 500x fewer weights (uniform TT rank, the
largest that reaches the compression), batch 1 / 64 / 256 and 1 / 2 threads, it times in one
process, interleaved in a shuffled order so that every variant sees the same machine load:

* ``linear``: ``nn.Linear``;
* ``tt``: ``TTLinear`` as shipped (``forward_mode="auto"``: cheapest contraction order, or rebuild
  ``W`` when that needs fewer multiply-adds);
* ``fact``: the contraction forced; ``rebuild``: ``W`` rebuilt from the cores + one matmul forced;
* ``tltorch``: tensorly-torch ``FactorizedLinear`` (``factorization="blocktt"``, the TT-matrix,
  ``implementation="factorized"``) with the same modes and ranks, when ``tensorly-torch`` imports.

It prints a markdown table of medians (microseconds) and ratios, with the MAC count of each path.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch
from torch import nn

from kdcompress.layers import TTLinear, choose_modes, max_ranks

try:
    import tltorch
except Exception as exc:  # noqa: BLE001
    tltorch = None
    print(f"note: tensorly-torch is not available ({exc}); the tltorch column is skipped")


def tt_layer(n_in: int, n_out: int, target: float) -> TTLinear:
    """The TTLinear with the largest uniform rank whose compression is at least ``target``."""
    in_modes, out_modes = choose_modes(n_in, n_out)
    sizes = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
    caps = max_ranks(sizes)
    best = None
    for rank in range(1, 512):
        ranks = [min(rank, c) for c in caps]
        layer = TTLinear(n_in, n_out, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        if n_in * n_out / layer.num_core_params() < target:
            break
        best = layer
    return best or TTLinear(n_in, n_out, in_modes=in_modes, out_modes=out_modes,
                            ranks=[1] * (len(in_modes) + 1))


def tltorch_layer(layer: TTLinear) -> nn.Module | None:
    if tltorch is None:
        return None
    try:
        peer = tltorch.FactorizedLinear(layer.in_modes, layer.out_modes, bias=True,
                                        factorization="blocktt", rank=list(layer.ranks),
                                        implementation="factorized")
        peer(torch.randn(2, math.prod(layer.in_modes)))
        return peer
    except Exception as exc:  # noqa: BLE001
        print(f"note: tltorch FactorizedLinear failed for {layer.ranks}: {exc}")
        return None


def forced(layer: TTLinear, mode: str):  # noqa: ANN201
    def run(x: torch.Tensor) -> torch.Tensor:
        layer.forward_mode = mode
        try:
            return layer(x)
        finally:
            layer.forward_mode = "auto"
    return run


rng = random.Random(0)


def time_round_robin(fns: dict[str, object], x: dict[str, torch.Tensor], repeats: int
                     ) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn_name, fn in fns.items():
            for _ in range(3):
                fn(x[fn_name])
        order = list(fns)
        for _ in range(repeats):
            rng.shuffle(order)  # no variant always runs right after another
            for fn_name in order:
                fn = fns[fn_name]
                start = time.perf_counter()
                fn(x[fn_name])
                times[fn_name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.manual_seed(0)
    repeats = 7 if args.quick else 25
    header = ("| layer | x fewer | modes (in/out) | rank | threads | batch | MACs fact/dense | "
              "linear us | tt us | fact us | rebuild us | tltorch us | linear/tt | "
              "rebuild/tt | tltorch/tt |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n_in, n_out in ((784, 512), (1024, 1024)):
        for target in (5, 20, 100, 500):
            layer = tt_layer(n_in, n_out, target).eval()
            dense = nn.Linear(n_in, n_out).eval()
            peer = tltorch_layer(layer)
            ratio = n_in * n_out / layer.num_core_params()
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch in (1, 64, 256):
                    x = torch.randn(batch, n_in)
                    fns = {"linear": dense, "tt": layer, "fact": forced(layer, "factorized"),
                           "rebuild": forced(layer, "dense")}
                    inputs = dict.fromkeys(fns, x)
                    if peer is not None:
                        fns["tltorch"] = peer
                        inputs["tltorch"] = torch.nn.functional.pad(
                            x, (0, math.prod(layer.in_modes) - n_in))
                    t = time_round_robin(fns, inputs, repeats)
                    macs = layer.macs(batch)
                    peer_t = f"{t['tltorch']:.0f}" if "tltorch" in t else "n/a"
                    peer_r = f"{t['tltorch'] / t['tt']:.2f}" if "tltorch" in t else "n/a"
                    print(f"| {n_out}x{n_in} | {ratio:.0f} | {layer.in_modes}/{layer.out_modes} "
                          f"| {max(layer.ranks)} | {threads} | {batch} | "
                          f"{macs['factorized'] / 1e6:.2f}M/{macs['linear'] / 1e6:.2f}M | "
                          f"{t['linear']:.0f} | {t['tt']:.0f} | {t['fact']:.0f} | "
                          f"{t['rebuild']:.0f} | {peer_t} | {t['linear'] / t['tt']:.2f} | "
                          f"{t['rebuild'] / t['tt']:.2f} | {peer_r} |", flush=True)


if __name__ == "__main__":
    main()
