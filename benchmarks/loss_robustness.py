"""The loss robustness sweep: every loss x dtype x feature scale x batch size, as a pass table.

Each point (:func:`kdcompress.losses.robustness.check`) draws random logits and features with
the given standard deviation, computes the loss in float32 or under ``torch.autocast`` (CPU)
with float16 / bfloat16 inputs, and its gradient with respect to the student's tensors. A point
passes when the value is finite and within ``1e-3`` relative + ``1e-4`` absolute of the same
loss in float64 on the same rounded inputs, the gradient has no NaN, and the gradient is finite
wherever the exact (float64) gradient fits the dtype. Where it does not (a float16 gradient
above 65504, e.g. a scale-invariant loss at features of 1e-7), the point is counted apart:
no loss can represent that gradient in float16; ``torch.amp.GradScaler`` lowers its scale there.

Usage: ``python benchmarks/loss_robustness.py [--batches 1 2 7 64 256] [--scales ...]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from kdcompress.losses import robustness as R


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(R.BATCHES))
    parser.add_argument("--scales", type=float, nargs="+", default=list(R.SCALES))
    parser.add_argument("--losses", nargs="+", default=list(R.LOSSES), choices=list(R.LOSSES),
                        metavar="LOSS")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    start = time.perf_counter()
    dtypes = [str(d).removeprefix("torch.") for d in R.DTYPES]
    print(f"scales {args.scales}, batches {args.batches}; "
          f"cell = points passed / points (points whose exact gradient exceeds the dtype)")
    print(f"| loss | {' | '.join(dtypes)} |")
    print(f"|---|{'---|' * len(dtypes)}")
    failures, total, out_of_range = [], 0, 0
    for name in args.losses:
        cells = []
        for dtype in R.DTYPES:
            results = R.sweep([name], [dtype], args.scales, args.batches)
            ok = sum(r.ok for r in results)
            beyond = sum(not r.grad_in_range for r in results)
            failures += [r for r in results if not r.ok]
            total += len(results)
            out_of_range += beyond
            cells.append(f"{ok}/{len(results)}" + (f" ({beyond})" if beyond else ""))
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    print(f"\n{total - len(failures)}/{total} points pass; {out_of_range} points have an exact "
          f"gradient beyond the dtype's range; {time.perf_counter() - start:.0f} s; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for r in failures:
        print(f"FAIL {r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
