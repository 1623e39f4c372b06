"""The kdcompress command: run a pipeline file, search its parameters, analyse a stage's
per-layer sensitivity, re-print a report, show a graph.

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


DATA_HELP = ("replace the pipeline's data: digits, mnist:DIR (IDX files), folder:DIR (image "
             "folders) or npz:FILE")


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
                     help=DATA_HELP)
    run.add_argument("--train-limit", type=int, metavar="N",
                     help="train on the first N training samples only (quick runs on MNIST)")
    run.add_argument("--threads", type=int, default=1, help="CPU threads for latency (default 1)")
    run.add_argument("--no-wait", action="store_true",
                     help="exit (code 2) instead of waiting when another run holds the run folder")
    _search_parser(sub)
    _sensitivity_parser(sub)
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
                        help="what to minimise, comma-separated: size, latency (batch 64), "
                        "latency_b1 (batch 1), accuracy (validation points lost); default "
                        "size,latency")
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
    search.add_argument("--retime-rounds", type=int, default=3, metavar="N",
                        help="before the front is chosen, time the models within the budget "
                        "again side by side, N rounds (default 3; 0: each trial's own timing)")
    search.add_argument("--latency-tolerance", type=float, default=0.05, metavar="FRACTION",
                        help="latencies this close count as equal when the front is chosen "
                        "(default 0.05: 5%%; 0: plain Pareto dominance)")
    search.add_argument("--storage", metavar="URL", help="optuna storage shared by workers "
                        "(default sqlite:///RUN/search/study.db)")
    search.add_argument("--study-name", metavar="NAME", help="default: the pipeline's name")
    search.add_argument("--device", default="cpu", help="cpu or cuda (training device)")
    search.add_argument("--data", metavar="NAME[:DIR]",
                        help=DATA_HELP)
    search.add_argument("--train-limit", type=int, metavar="N",
                        help="train on the first N training samples only")
    search.add_argument("--threads", type=int, default=1, help="CPU threads for latency")


def _sensitivity_parser(sub: argparse._SubParsersAction) -> None:
    sens = sub.add_parser(
        "sensitivity", help="per layer of one stage's model, the validation accuracy lost at "
        "each TT/SVD rank, prune ratio (and in int8), without retraining")
    sens.add_argument("file", help="a Python file defining `pipeline`")
    sens.add_argument("--stage", required=True, metavar="NAME",
                      help="the stage whose model is analysed (run up to it, from the cache)")
    sens.add_argument("--out", help="run folder (as for `run`); results go to "
                      "RUN/analysis/<stage>/")
    sens.add_argument("--data", metavar="NAME[:DIR]",
                      help=DATA_HELP)
    sens.add_argument("--train-limit", type=int, metavar="N",
                      help="train on the first N training samples only")
    sens.add_argument("--samples", type=int, default=1000, metavar="N",
                      help="validation samples scored, the first N of the split (default 1000)")
    sens.add_argument("--kinds", nargs="+", default=["tt", "prune"], metavar="KIND",
                      help="what to change: tt, svd, prune, int8 (default: tt prune)")
    sens.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32],
                      metavar="R", help="TT/SVD rank ladder (default 1 2 4 8 16 32)")
    sens.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.7],
                      metavar="F", help="prune ratio ladder in (0, 1) (default 0.1 0.2 0.3 0.5 "
                      "0.7)")
    sens.add_argument("--method", default="tt", help="the decomposition of kind tt: tt or svd")
    sens.add_argument("--layers", nargs="+", metavar="NAME",
                      help="decomposable layers by qualified name (default: every nn.Linear "
                      "whose factorisation is smaller); also limits the prune groups")
    sens.add_argument("--int8", action="store_true",
                      help="add each quantizable ONNX node alone in int8 (kind int8)")
    sens.add_argument("--device", default="cpu", help="cpu or cuda (training device)")
    sens.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    sens.add_argument("--no-plot", action="store_true", help="skip the heat map PNG")


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
        if args.command == "sensitivity":
            return _sensitivity(args, console, err)
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
                          seed=args.seed, storage=args.storage, study_name=args.study_name,
                          retime_rounds=args.retime_rounds,
                          latency_tolerance=args.latency_tolerance)
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


def _sensitivity_checks(args: argparse.Namespace, pipeline) -> tuple[str, ...]:
    """Everything that can be refused before a stage runs; returns the kinds asked."""
    from kdcompress.analysis.sensitivity import TORCH_KINDS, check_settings
    from kdcompress.errors import did_you_mean

    if args.stage not in pipeline.stages:
        raise UsageError(f"--stage '{args.stage}' is not a stage of '{pipeline.name}'."
                         f"{did_you_mean(args.stage, pipeline.stages)} Stages: "
                         f"{', '.join(pipeline.order())}")
    kinds = tuple(dict.fromkeys([*args.kinds, *(["int8"] if args.int8 else [])]))
    check_settings(kinds, args.ranks, args.ratios, args.method, args.samples)
    asked = [k for k in kinds if k in TORCH_KINDS]
    if asked and pipeline.output_kind(args.stage) == {"onnx"}:
        torch_stages = [n for n in pipeline.order() if pipeline.output_kind(n) == {"torch"}]
        raise UsageError(f"stage '{args.stage}' produces an ONNX graph, but {', '.join(asked)} "
                         "cells change a torch model: pick a stage before export_onnx ("
                         f"{', '.join(torch_stages) or 'none here'}), or ask --kinds int8")
    return kinds


def _sensitivity(args: argparse.Namespace, console, err) -> int:
    import tempfile

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from kdcompress.analysis import sensitivity
    from kdcompress.analysis.files import render_tables
    from kdcompress.errors import RunFailed
    from kdcompress.metrics import MeasureConfig
    from kdcompress.options import RunOptions
    from kdcompress.progress import RichProgress
    from kdcompress.runner import Runner

    pipeline = load_pipeline(args.file)
    kinds = _sensitivity_checks(args, pipeline)
    task = _task(args, pipeline)
    with tempfile.TemporaryDirectory() as scratch:  # the run's own report stays as it is
        options = RunOptions(out=args.out, device=args.device, until=args.stage, data=task,
                             threads=args.threads, plot=False, read_test=False,
                             measure_only=(args.stage,), report_dir=scratch,
                             measure=MeasureConfig(threads=args.threads, warmup=1, repeats=3,
                                                   min_seconds=0.0))
        runner = Runner(pipeline, options, progress=RichProgress(console))
        try:
            runner.run()
        except RunFailed as exc:
            err.print(f"[red bold]failed:[/] {exc}", highlight=False)
            return EXIT_STAGE_FAILED
    model = runner.artifacts[args.stage]
    with Progress(TextColumn("sensitivity {task.description}"), BarColumn(),
                  MofNCompleteColumn(), console=console, transient=True) as bar:
        task_id = bar.add_task("", total=None)

        def progress(kind: str, done: int, total: int) -> None:
            bar.update(task_id, description=kind, completed=done, total=total)

        result = sensitivity(model, runner.task, kinds=kinds, ranks=args.ranks,
                             ratios=args.ratios, method=args.method, layers=args.layers,
                             samples=args.samples, progress=progress, metric=pipeline.metric)
    folder = options.run_dir(pipeline.name) / "analysis" / args.stage
    paths = result.save(folder, plot=not args.no_plot)
    for table in render_tables(result):
        console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note[/] {note}", highlight=False)
    how = "incremental" if result.incremental else "full forward pass per cell"
    console.print(f"{len(result.cells)} cells in {result.seconds:.1f} s ({how}): "
                  + ", ".join(str(p) for p in paths.values()), highlight=False)
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
