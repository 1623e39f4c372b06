"""`kdcompress search` of the flagship pipeline on MNIST within a wall-clock budget.

Run by hand (it is not a test)::

    python benchmarks/search_mnist.py --data DIR                     # 45 minutes of trials
    python benchmarks/search_mnist.py --data DIR --budget-minutes 2 --train-limit 600   # a check
    python benchmarks/search_mnist.py --data DIR --flagship-first   # after the flagship's own run

The search (pipelines/tt_distill_quant_search.py: TT rank, pruning ratio, TT export) runs into
``--out`` (default ``runs/search_mnist``), which holds the optuna study and every stage it
computed. Killed at any moment, the same command resumes: the budget counts the wall time of the
trials that ended, a trial left running is redone, finished stages load from the cache.
Trials start until the budget is spent (the last one may end after it). Then the front is
measured on the 10,000 test images, and the script prints markdown: the trials and what the
cache saved, the front against the hand-set defaults of pipelines/tt_distill_quant.py, and the
best pipeline files.

With ``--flagship-first`` the hand-written flagship (pipelines/tt_distill_quant.py) is first run
with ``kdcompress run`` semantics into the same folder, as a user who compares a search with it
has done anyway; its wall time is printed apart and not counted in the budget. The search's
defaults are the flagship's settings, so its first trial, and the teacher of every other one,
then come from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from kdcompress import data
from kdcompress.cli import load_pipeline
from kdcompress.options import RunOptions
from kdcompress.report import format_bytes
from kdcompress.search.live import RichSearchProgress
from kdcompress.search.study import Search, SearchConfig

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "tt_distill_quant_search.py"
FLAGSHIP = ROOT / "pipelines" / "tt_distill_quant.py"


def spent_seconds(search: Search) -> float:
    """Wall time of the trials that ended in the study (this benchmark runs one worker; a trial
    cut short by a kill is redone, and only the redone one counts)."""
    return sum(float(t.user_attrs.get("seconds", 0.0))
               for t in search.study.get_trials(deepcopy=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(data.DATA_ENV),
                        help="folder with the four MNIST IDX files (or set KDCOMPRESS_DATA)")
    parser.add_argument("--train-limit", type=int, default=6000,
                        help="training images (the README's MNIST run uses 6000)")
    parser.add_argument("--budget-minutes", type=float, default=45.0,
                        help="wall time of all trials, earlier runs of this command included")
    parser.add_argument("--max-drop", type=float, default=0.5,
                        help="validation accuracy points the int8 model may lose")
    parser.add_argument("--out", type=Path, default=Path("runs/search_mnist"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    parser.add_argument("--objectives", default="size,latency_b1,latency",
                        help="what the search minimises (default: size, batch-1 and batch-64 "
                             "latency)")
    parser.add_argument("--bars-only", action="store_true",
                        help="print the bars of the finished search in --out, running nothing")
    parser.add_argument("--flagship-first", action="store_true",
                        help="run the hand-written flagship into --out before the search (its "
                             "time is not counted in the budget)")
    args = parser.parse_args()
    if args.bars_only:
        frontier = args.out / "search" / "frontier.json"
        if not frontier.is_file():
            parser.error(f"--bars-only reads {frontier}, which does not exist: give --out the run "
                         "folder of a finished search")
        print("\n".join(bars(json.loads(frontier.read_text()))))
        return
    if not args.data:
        parser.error("give --data DIR (the four MNIST IDX files) or set KDCOMPRESS_DATA")

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the live table reports the trials
    task = data.limit_train(data.mnist(args.data), args.train_limit)
    flagship_seconds = None
    if args.flagship_first:
        started = time.monotonic()
        load_pipeline(FLAGSHIP).run(RunOptions(out=args.out, data=task, threads=args.threads))
        flagship_seconds = time.monotonic() - started
    search = Search(load_pipeline(PIPELINE),
                    SearchConfig(objectives=tuple(args.objectives.split(",")),
                                 max_drop=args.max_drop),
                    RunOptions(out=args.out, data=task, threads=args.threads),
                    progress=RichSearchProgress())
    budget = 60 * args.budget_minutes
    before = spent_seconds(search)
    started = time.monotonic()
    if budget - before > 0:
        search.optimize(timeout=budget - before)
    result = search.finish()
    doc = result.to_dict()
    this_run = time.monotonic() - started

    print(f"\n## kdcompress search on MNIST ({args.train_limit} training images)\n")
    print(f"`python benchmarks/search_mnist.py --data DIR --train-limit {args.train_limit} "
          f"--budget-minutes {args.budget_minutes:g} --max-drop {args.max_drop:g} "
          f"--objectives {args.objectives}"
          + (" --flagship-first" if args.flagship_first else "") + "`\n")
    if flagship_seconds is not None:
        print(f"- the flagship's own run first: {flagship_seconds / 60:.1f} min (not in the "
              "budget)")
    print(f"- budget {args.budget_minutes:g} min of trials; spent {spent_seconds(search) / 60:.1f} "
          f"min ({before / 60:.1f} in earlier runs); this run {this_run / 60:.1f} min with the "
          "front")
    print(f"- {result.summary()}")
    if result.pending or not result.front:
        return
    front = (args.out / "search" / "frontier.md").read_text().split("## Trials")[0]
    print("\n" + front.split("## Front (test split read after the search)")[1].strip())
    default = doc.get("default_point")
    if default and result.front:
        print(f"\nDefault settings (trial {default['trial']}): test "
              f"{100 * default['accuracy']:.2f}%, {format_bytes(default['size_bytes'])}, "
              f"b64 {default['latency_ms']['batch_64']['p50']:.3f} ms.")
        for objective, number in result.best.items():
            point = next(p for p in result.front if p.trial == number)
            print(f"Best {objective} (trial {number}, {point.values}): test "
                  f"{100 * point.accuracy:.2f}%, {format_bytes(point.size_bytes)}, b64 "
                  f"{point.latency_ms['batch_64']['p50']:.3f} ms"
                  + (f" -> {args.out / 'search' / f'best-{objective}.py'}"
                     if f"best-{objective}.py" in point.files else ""))
    print("\n" + "\n".join(bars(doc)))


def _b(point: dict, batch: int) -> float:
    return point["latency_ms"][f"batch_{batch}"]["p50"]


def bars(doc: dict) -> list[str]:
    """The search issue's three bars, checked on the test split of the front's points (measured
    after the search) against the default settings (the hand-written flagship) and the teacher."""
    front, default, teacher = doc["front"], doc.get("default_point"), doc.get("baseline_point")
    if not front or not default or not teacher:
        return ["Bars: not checked (no front, default or baseline point)."]
    lines = ["Bars (test split, measured after the search):"]
    dominating = [p for p in front if p["accuracy"] >= default["accuracy"]
                  and p["size_bytes"] < default["size_bytes"]
                  and _b(p, 1) < _b(default, 1) and _b(p, 64) < _b(default, 64)]
    lines.append(f"- dominates the flagship's settings (trial {default['trial']}, test "
                 f"{100 * default['accuracy']:.2f}%, {format_bytes(default['size_bytes'])}, "
                 f"b1 {_b(default, 1):.3f} ms, b64 {_b(default, 64):.3f} ms), latencies of the "
                 "final measurement (each point in its own run, beside the teacher): "
                 + (", ".join(f"trial {p['trial']}" for p in dominating) or "none"))
    # the same with the latencies of the search's re-timing: every model within the budget,
    # the flagship's settings included, timed in turns in one session (ratios side by side)
    timed = {t["number"]: t.get("objectives") or {} for t in doc.get("trials", [])}

    def retimed(trial: int, key: str) -> float:
        return timed.get(trial, {}).get(key, float("inf"))

    b1, b64 = retimed(default["trial"], "latency_b1"), retimed(default["trial"], "latency")
    if doc.get("retimed") and max(b1, b64) < float("inf"):
        side = [p for p in front if p["accuracy"] >= default["accuracy"]
                and p["size_bytes"] < default["size_bytes"]
                and retimed(p["trial"], "latency_b1") < b1 and retimed(p["trial"], "latency") < b64]
        lines.append(f"- the same on the re-timing side by side (flagship's settings b1 "
                     f"{b1:.3f} ms, b64 {b64:.3f} ms): "
                     + (", ".join(f"trial {p['trial']} (b1 {retimed(p['trial'], 'latency_b1'):.3f}"
                                  f", b64 {retimed(p['trial'], 'latency'):.3f} ms)" for p in side)
                        or "none"))
    near = [p for p in front if 100 * (teacher["accuracy"] - p["accuracy"]) <= 0.5]
    for label, key in (("smaller", lambda p: teacher["size_bytes"] / p["size_bytes"]),
                       ("faster at batch 1", lambda p: _b(teacher, 1) / _b(p, 1))):
        if near:
            best = max(near, key=key)
            lines.append(f"- within 0.5 test points of the teacher "
                         f"({100 * teacher['accuracy']:.2f}%), most {label}: trial "
                         f"{best['trial']} at {key(best):.1f}x "
                         f"({100 * best['accuracy']:.2f}%)")
        else:
            lines.append(f"- no front point within 0.5 test points of the teacher ({label})")
    return lines


if __name__ == "__main__":
    main()
