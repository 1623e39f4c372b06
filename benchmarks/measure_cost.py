"""What measuring a run costs, under the report's timing budget and without it.

Run by hand (it is not a test)::

    python benchmarks/measure_cost.py                                  # the flagship on digits
    python benchmarks/measure_cost.py --data mnist:DIR --train-limit 20000 --out runs/cost_mnist

The flagship pipeline (pipelines/tt_distill_quant.py) is run once into ``--out`` (computed, or
loaded when the folder already holds it), then re-run from the cache ``--rounds`` times under
each measurement policy, the two alternating (A B, B A, ...) so that both meet the same moments
of the machine's load:

- **budget**: the report's ruler as it is (``MeasureConfig()``: 20 timed runs per batch size,
  fewer for a call whose 20 runs would take over ``max_seconds``, 0.5 s);
- **no budget**: the same with ``max_seconds=None`` (always 20 timed runs after 5 warm-up ones).

``--sleeps BASELINE MS ...`` instead runs the ruler alone, on calls that sleep as long as the
given batch-64 latencies (the first one the baseline, timed alone; every other one beside it),
under both policies: what the timing costs for another machine's latencies, e.g. a GPU host's
CPU columns, without the machine (the timing loop's own cost; sleeping uses no CPU).

A re-run from the cache does nothing but measure, so its wall time and the rows'
``measure_seconds`` are the cost of measuring. It prints, per stage, the median measurement
seconds under each policy and the two policies' median latencies side by side (the ratio is
budget over no budget: near 1 when the shorter timing gives the same figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from kdcompress import data
from kdcompress.cli import load_pipeline
from kdcompress.metrics import MeasureConfig
from kdcompress.options import RunOptions
from kdcompress.runner import run

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"budget": MeasureConfig(), "no budget": MeasureConfig(max_seconds=None)}


def ruler_on_sleeps(latencies_ms: list[float]) -> None:
    """Print the seconds the ruler spends on sleeps of ``latencies_ms`` under each policy."""
    from kdcompress.metrics import time_calls

    def sleeper(ms: float):
        return lambda: time.sleep(ms / 1e3)

    base, *others = latencies_ms
    print("| policy | seconds | timed runs per call |")
    print("|---|---:|---|")
    for name, config in POLICIES.items():
        start = time.perf_counter()
        runs = [time_calls([sleeper(base)], config)[0]["runs"]]
        runs += [time_calls([sleeper(ms), sleeper(base)], config)[0]["runs"] for ms in others]
        print(f"| {name} | {time.perf_counter() - start:.2f} | {', '.join(map(str, runs))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None,
                        help="data spec as for `kdcompress run --data` (default: the "
                             "pipeline's digits)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/measure_cost"))
    parser.add_argument("--rounds", type=int, default=3,
                        help="re-runs from the cache per policy (alternating)")
    parser.add_argument("--sleeps", type=float, nargs="+", metavar="MS",
                        help="time the ruler on sleeps of these lengths (ms; the first is the "
                             "baseline) instead of running the pipeline")
    args = parser.parse_args()
    if args.sleeps:
        ruler_on_sleeps(args.sleeps)
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, but got {args.rounds}")
    pipeline = load_pipeline(ROOT / "pipelines" / "tt_distill_quant.py")
    task = data.get(args.data) if args.data else None
    if args.train_limit is not None:
        task = data.limit_train(task or pipeline.data, args.train_limit)

    start = time.perf_counter()
    first = run(pipeline, RunOptions(out=args.out, data=task, plot=False))
    print(f"first run: {time.perf_counter() - start:.1f} s "
          f"({'from the cache' if all(r.cached for r in first.stages) else 'computed'})")

    load_before = os.getloadavg()[0]
    walls: dict[str, list[float]] = {k: [] for k in POLICIES}
    rows: dict[str, list] = {k: [] for k in POLICIES}
    order = list(POLICIES)
    for i in range(args.rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            report = run(pipeline, RunOptions(out=args.out, data=task, plot=False,
                                              measure=POLICIES[name]))
            walls[name].append(time.perf_counter() - t0)
            if not all(r.cached for r in report.stages):
                raise SystemExit(f"a re-run computed a stage: {[r.name for r in report.stages]}")
            rows[name].append(report.stages)
    load_after = os.getloadavg()[0]

    n = len((task or pipeline.data).split("train"))
    print(f"\n## Measuring the flagship's run ({n} training images): budget against none\n")
    print(f"`python benchmarks/measure_cost.py{' --data ' + args.data if args.data else ''}"
          f"{f' --train-limit {args.train_limit}' if args.train_limit else ''} --rounds "
          f"{args.rounds}`; load average {load_before:.2f} before, {load_after:.2f} after; "
          f"medians of {args.rounds} re-runs from the cache per policy, alternating.\n")
    print("| stage | measure s, budget | measure s, no budget | timed runs b1 / b64, budget "
          "| b1 ms budget / none | b64 ms budget / none | ratio b1 / b64 |")
    print("|---|---:|---:|---|---:|---:|---|")
    names = [r.name for r in first.stages]
    totals = {k: 0.0 for k in POLICIES}
    for j, stage in enumerate(names):
        cells = {}
        for policy in POLICIES:
            stage_rows = [stages[j] for stages in rows[policy]]
            seconds = statistics.median(r.measure_seconds for r in stage_rows)
            totals[policy] += seconds
            p50 = {b: statistics.median(r.latency_ms[b]["p50"] for r in stage_rows)
                   for b in ("batch_1", "batch_64")}
            runs = "/".join(str(stage_rows[0].latency_ms[b]["runs"])
                            for b in ("batch_1", "batch_64"))
            cells[policy] = (seconds, p50, runs)
        (s_a, p_a, runs_a), (s_b, p_b, _) = cells["budget"], cells["no budget"]
        print(f"| {stage} | {s_a:.2f} | {s_b:.2f} | {runs_a} | "
              f"{p_a['batch_1']:.3f} / {p_b['batch_1']:.3f} | "
              f"{p_a['batch_64']:.3f} / {p_b['batch_64']:.3f} | "
              f"{p_a['batch_1'] / p_b['batch_1']:.3f} / {p_a['batch_64'] / p_b['batch_64']:.3f} |")
    print(f"| **all** | **{totals['budget']:.2f}** | **{totals['no budget']:.2f}** | | | | |")
    print(f"\nRe-run wall time, median: budget {statistics.median(walls['budget']):.1f} s, no "
          f"budget {statistics.median(walls['no budget']):.1f} s "
          f"({statistics.median(walls['budget']) / statistics.median(walls['no budget']):.2f}x).")


if __name__ == "__main__":
    main()
