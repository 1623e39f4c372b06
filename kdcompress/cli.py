"""The kdcompress command: run a pipeline file, search its parameters, re-print a report, show a
graph.

Exit codes: 0 success (for a search, also when no trial met the budget); 1 a stage failed (the
report up to it is written and names it) or the run folder cannot be written; 2 bad usage, a bad
pipeline file, an invalid search space or bad data (detected before any stage runs), or a run
folder locked by another run with --no-wait; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import traceback
from pathlib import Path

import kdcompress
from kdcompress.errors import KDCompressError, RunFolderLocked, StoreError, UsageError

__all__ = ["main", "load_pipeline"]

EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def load_pipeline(path: str | Path):  # -> Pipeline
    """Execute a pipeline file and return its ``pipeline`` object (or what ``build()`` returns).

    Raises
    ------
    UsageError
        The file is missing, does not parse, raises while defining the pipeline, or defines no
        pipeline.
    """
    from kdcompress.fingerprint import PIPELINE_MODULE_PREFIX
    from kdcompress.pipeline import Pipeline

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"pipeline file {path} does not exist")
    module_name = f"{PIPELINE_MODULE_PREFIX}{path.stem}".replace("-", "_")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    from kdcompress.runner import seed_everything

    seed_everything(0)  # models built before Pipeline(seed=...) reseeds are the same every run
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise UsageError(f"{path}:{exc.lineno}: syntax error: {exc.msg}\n    "
                         f"{(exc.text or '').strip()}") from exc
    except KDCompressError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise UsageError(f"{path}: defining the pipeline raised {type(exc).__name__}: {exc} "
                         f"(at {Path(frame.filename).name}:{frame.lineno})") from exc
    pipeline = getattr(module, "pipeline", None)
    if pipeline is None and callable(getattr(module, "build", None)):
        pipeline = module.build()
    if pipeline is None:
        raise UsageError(f"{path} defines no 'pipeline': end it with "
                         "pipeline = Pipeline(...) or define build() returning one")
    if not isinstance(pipeline, Pipeline):
        raise UsageError(f"{path}: 'pipeline' is a {type(pipeline).__name__}, not a "
                         "kdcompress.Pipeline")
    pipeline.validate()
    return pipeline


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcompress", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version",
                        version=f"kdcompress {kdcompress.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline file")
    run.add_argument("file", help="a Python file defining `pipeline`")
    run.add_argument("--out", help="run folder (default runs/<pipeline name>, or "
                     "runs/<pipeline name>-<data> with --data)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (training device)")
    run.add_argument("--fresh", action="store_true", help="ignore cached stages")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--only", metavar="STAGE",
                     help="re-run only this stage (its inputs must be cached)")
    run.add_argument("--data", metavar="NAME[:DIR]",
                     help="replace the pipeline's data: digits, or mnist:DIR (IDX files)")
    run.add_argument("--train-limit", type=int, metavar="N",
                     help="train on the first N training samples only (quick runs on MNIST)")
    run.add_argument("--threads", type=int, default=1, help="CPU threads for latency (default 1)")
    run.add_argument("--no-wait", action="store_true",
                     help="exit (code 2) instead of waiting when another run holds the run folder")
    _search_parser(sub)
    report = sub.add_parser("report", help="print a run's report (and a search's front) again")
    report.add_argument("run_dir", help="a run folder holding report.json or search/")
    report.add_argument("--markdown", action="store_true",
                        help="print report.md (and search/frontier.md) instead")
    graph = sub.add_parser("graph", help="print a pipeline's DAG")
    graph.add_argument("file", help="a Python file defining `pipeline`")
    graph.add_argument("--image", metavar="PNG", help="also draw the DAG into this image")
    return parser


def _search_parser(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser(
        "search", help="search a pipeline's ks.choice/ks.int/ks.float parameters: the Pareto "
        "front of size and latency within a validation accuracy budget")
    search.add_argument("file", help="a Python file defining `pipeline` with search parameters")
    search.add_argument("--out", help="run folder shared by every trial, with the study in "
                        "search/ (default runs/<pipeline name>, or runs/<name>-<data>)")
    search.add_argument("--trials", type=int, metavar="N",
                        help="value sets tried in the study when the search stops, earlier "
                        "runs' and other workers' included (default 20 without --timeout)")
    search.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="start no trial after this many seconds")
    search.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                        help="budget: validation accuracy points the target may lose against "
                        "the baseline (default 1.0)")
    search.add_argument("--objectives", default="size,latency",
                        help="what to minimise, comma-separated: size, latency (default both)")
    search.add_argument("--target", metavar="STAGE",
                        help="the stage optimised (default the pipeline's final stage)")
    search.add_argument("--sampler", default="tpe", help="tpe (default) or nsga2")
    search.add_argument("--pruner", default="budget",
                        help="budget (stop trials behind every one within budget; default) or "
                        "none")
    search.add_argument("--startup-trials", type=int, default=8, metavar="N",
                        help="random trials before TPE models the results; NSGA-II's "
                        "population (default 8)")
    search.add_argument("--seed", type=int, default=0, help="seeds the sampler (default 0)")
    search.add_argument("--storage", metavar="URL", help="optuna storage shared by workers "
                        "(default sqlite:///RUN/search/study.db)")
    search.add_argument("--study-name", metavar="NAME", help="default: the pipeline's name")
    search.add_argument("--device", default="cpu", help="cpu or cuda (training device)")
    search.add_argument("--data", metavar="NAME[:DIR]",
                        help="replace the pipeline's data: digits, or mnist:DIR (IDX files)")
    search.add_argument("--train-limit", type=int, metavar="N",
                        help="train on the first N training samples only")
    search.add_argument("--threads", type=int, default=1, help="CPU threads for latency")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdcompress`` command; returns the exit code."""
    from kdcompress.progress import make_console

    console = make_console()
    err = make_console(stderr=True)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, bad usage exits 2
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _run(args, console, err)
        if args.command == "search":
            return _search(args, console)
        if args.command == "report":
            return _report(args, console)
        return _graph(args, console)
    except RunFolderLocked as exc:
        err.print(f"[red bold]error:[/] {exc}", highlight=False)
        return EXIT_USAGE
    except StoreError as exc:
        err.print(f"[red bold]error:[/] {exc}", highlight=False)
        return EXIT_STAGE_FAILED
    except KDCompressError as exc:
        err.print(f"[red bold]error:[/] {exc}", highlight=False)
        return EXIT_USAGE
    except OSError as exc:  # the file system failed outside a stage (report folder, disk full)
        err.print(f"[red bold]error:[/] {exc.filename or ''}: {exc.strerror or exc}",
                  highlight=False)
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: completed stages are kept; run again to resume")
        return EXIT_INTERRUPTED


def _task(args: argparse.Namespace, pipeline):  # -> Task | None
    """The data of ``--data`` and ``--train-limit``, or ``None`` for the pipeline's own."""
    from kdcompress import data as data_module

    task = data_module.get(args.data) if args.data else None
    if args.train_limit is not None:
        task = data_module.limit_train(task or pipeline.data or data_module.digits(),
                                       args.train_limit)
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, but got {args.threads}")
    return task


def _run(args: argparse.Namespace, console, err) -> int:
    from kdcompress import distributed
    from kdcompress.errors import RunFailed
    from kdcompress.options import RunOptions
    from kdcompress.progress import RichProgress

    pipeline = load_pipeline(args.file)
    task = _task(args, pipeline)
    options = RunOptions(out=args.out, device=args.device, fresh=args.fresh, until=args.until,
                         only=args.only, data=task, threads=args.threads,
                         wait=not args.no_wait)
    out = options.run_dir(pipeline.name)
    try:
        pipeline.run(options, progress=RichProgress(console))
    except RunFailed as exc:
        if not distributed.is_main():
            return EXIT_STAGE_FAILED
        err.print(f"[red bold]failed:[/] {exc}", highlight=False)
        err.print(f"the report up to '{exc.stage}' is in {out}/report.md; completed stages are "
                  "cached, fix the stage and run again to resume", highlight=False)
        return EXIT_STAGE_FAILED
    if distributed.is_main():
        console.print(f"report: {out}/report.md, {out}/report.json, {out}/report.png",
                      highlight=False)
    return EXIT_OK


def _search(args: argparse.Namespace, console) -> int:
    import optuna

    from kdcompress.options import RunOptions
    from kdcompress.search.live import RichSearchProgress
    from kdcompress.search.study import Search, SearchConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the live table reports the trials
    pipeline = load_pipeline(args.file)
    config = SearchConfig(objectives=tuple(o.strip() for o in args.objectives.split(",")
                                           if o.strip()),
                          max_drop=args.max_drop, target=args.target, sampler=args.sampler,
                          pruner=args.pruner, startup_trials=args.startup_trials,
                          seed=args.seed, storage=args.storage, study_name=args.study_name)
    options = RunOptions(out=args.out, device=args.device, data=_task(args, pipeline),
                         threads=args.threads)
    progress = RichSearchProgress(console)
    search = Search(pipeline, config, options, progress=progress)
    try:
        result = search.run(trials=args.trials, timeout=args.timeout)
    finally:
        progress.close()  # an interrupted search leaves the terminal as it found it
    if not result.pending:
        console.print(f"front: {search.dir}/frontier.md, frontier.json, frontier.png"
                      + "".join(f"; best {o}: {search.dir}/best-{o}.py" for o in result.best),
                      highlight=False)
    return EXIT_OK


def _report(args: argparse.Namespace, console) -> int:
    from kdcompress.report import REPORT_JSON, REPORT_MD, load_report, render_table
    from kdcompress.search.front import FRONTIER_MD, load_front, render_front, summary

    run_dir = Path(args.run_dir)
    front = load_front(run_dir)
    report = load_report(run_dir) if front is None or (run_dir / REPORT_JSON).is_file() \
        else None
    if args.markdown:
        if report is not None:
            console.print((run_dir / REPORT_MD).read_text(), markup=False, highlight=False)
        if front is not None:
            console.print((run_dir / "search" / FRONTIER_MD).read_text(), markup=False,
                          highlight=False)
        return EXIT_OK
    if report is not None:
        console.print(render_table(report))
        for r in report.stages:
            for flag in r.flags:
                console.print(f"[yellow]note[/] {r.name}: {flag}", highlight=False)
    if front is not None:
        console.print(render_front(front))
        console.print(summary(front), highlight=False, soft_wrap=True)
    return EXIT_STAGE_FAILED if report is not None and report.failed else EXIT_OK


def _graph(args: argparse.Namespace, console) -> int:
    import networkx as nx

    pipeline = load_pipeline(args.file)
    g = pipeline.graph()
    console.print(f"[bold]{pipeline.name}[/] ({len(g)} stages)")
    for line in nx.generate_network_text(g, sources=None):
        console.print(line, markup=False, highlight=False)
    console.print()
    for name in pipeline.order():
        stage = pipeline.stages[name]
        args_text = [f"{k}={_short(v)}" for k, v in stage.inputs.items()]
        args_text += [f"{k}={_short(v)}" for k, v in stage.constants.items()]
        console.print(f"{name} = {stage.fn.__name__}({', '.join(args_text)})", markup=False,
                      highlight=False)
    if args.image:
        from kdcompress.graphplot import draw

        draw(g, args.image)
        console.print(f"DAG drawn in {args.image}")
    return EXIT_OK


def _short(value) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
