"""How steady a search's front is: chosen on each trial's own timing, or on the models within the
budget timed again side by side.

Run by hand (it is not a test)::

    python benchmarks/search_retime.py                  # 8 trials on digits, 3 choices of the front
    python benchmarks/search_retime.py --trials 12 --repeats 5 --out runs/search_retime

It runs (or resumes) the digits search of pipelines/tt_distill_quant_search.py with the objectives
size, batch-1 and batch-64 latency, then chooses the front ``--repeats`` times
(``Search.finish()``: each time the models within the budget are timed again side by side, and the
front measured on the test split). It prints, as markdown, each trial's own latencies next to the
re-timed ones (their median over the repeats and their spread, max/min), and the front each time
against the front on the trials' own timings; then, from the same re-timings, the front chosen with
plain Pareto dominance against the search's latency tolerance (``--tolerance``, default the
search's 5%): how many different fronts each gives over the repeats. Run it on a quiet machine:
check the load average it prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from kdcompress.cli import load_pipeline
from kdcompress.options import RunOptions
from kdcompress.report import format_bytes
from kdcompress.search.front import pareto
from kdcompress.search.study import Search, SearchConfig

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "tt_distill_quant_search.py"
OBJECTIVES = ("size", "latency_b1", "latency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3,
                        help="times the front is chosen again, each on a new re-timing")
    parser.add_argument("--rounds", type=int, default=3, help="re-timing rounds per choice")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("runs/search_retime"))
    parser.add_argument("--tolerance", type=float, default=SearchConfig.latency_tolerance,
                        help="the front's latency tolerance (compared with 0)")
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = Search(load_pipeline(PIPELINE),
                    SearchConfig(objectives=OBJECTIVES, max_drop=args.max_drop,
                                 retime_rounds=args.rounds,
                                 latency_tolerance=args.tolerance),
                    RunOptions(out=args.out, plot=False))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    search.optimize(trials=args.trials)
    trial_minutes = (time.perf_counter() - started) / 60
    results = []
    for _ in range(args.repeats):
        results.append(search.finish())
    load_after = os.getloadavg()[0]

    first = results[0]
    within = [t for t in first.trials if t.state == "complete" and t.feasible
              and t.search_objectives is not None]
    own_front = {within[i].number for i in pareto([t.search_objectives for t in within],
                                                  OBJECTIVES, tolerance=args.tolerance)}
    # each re-timing's trials by number, in the order of ``within``
    numbered = [{u.number: u for u in r.trials} for r in results]
    retimed = [[trials[t.number] for t in within] for trials in numbered]
    print(f"## The front on one ruler: {len(first.trials)} trials of the digits search\n")
    print(f"`python benchmarks/search_retime.py --trials {args.trials} --repeats {args.repeats} "
          f"--rounds {args.rounds}`: trials {trial_minutes:.1f} min (this run); load average "
          f"{load_before:.2f} before, {load_after:.2f} after.\n")
    print("| trial | values | size | b1 ms: own | b1 ms: re-timed (spread) | b64 ms: own | "
          "b64 ms: re-timed (spread) | front: own | front: re-timed |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for i, t in enumerate(within):
        cells = []
        for key in ("latency_b1", "latency"):
            again = [timed[i].objectives[key] for timed in retimed]
            cells += [f"{t.search_objectives[key]:.3f}",
                      f"{statistics.median(again):.3f} ({max(again) / min(again):.2f}x)"]
        fronts = sum(t.number in {p.trial for p in r.front} for r in results)
        print(f"| {t.number} | {t.values} | {format_bytes(int(t.objectives['size']))} | "
              f"{cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
              f"{'yes' if t.number in own_front else ''} | {fronts} of {len(results)} |")
    print()
    for i, r in enumerate(results):
        info = r.retimed or {}
        print(f"- choice {i + 1}: front {sorted(p.trial for p in r.front)}; re-timing "
              f"{info.get('seconds', float('nan')):.1f} s for {info.get('models')} models, "
              f"load {info.get('load')}; joined {info.get('joined')}, left {info.get('left')}")
    print(f"- on the trials' own timings: front {sorted(own_front)}")
    print()
    for tolerance in (0.0, args.tolerance):
        fronts = [tuple(sorted(timed[j].number for j in pareto(
            [u.objectives for u in timed], OBJECTIVES, tolerance=tolerance))) for timed in retimed]
        print(f"- latency tolerance {tolerance:.0%}: {len(set(fronts))} different front(s) over "
              f"{len(fronts)} re-timings: " + "; ".join(str(list(f)) for f in fronts))


if __name__ == "__main__":
    main()
