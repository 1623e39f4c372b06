"""The outcome of a search: its trials, the Pareto front measured on the test split, its files.

``RUN/search/`` after a search::

    study.db                   the optuna study (trials, parameters, objectives, constraints)
    trials/<number>/report.*   each trial's report (validation only: no test accuracy)
    front/<number>/report.*    each front pipeline's report, measured on the test split
    frontier.json              every trial and the front, machine-readable
    frontier.md                the front and every trial as tables
    frontier.png               objectives of every trial (faint), the front highlighted,
                               the baseline and the file's default pipeline marked
    best-<objective>.py        the pipeline file with the values of the front's best point for
                               that objective written in place of its search parameters
    best-<objective>.onnx      that point's model

>>> pareto([{"size": 3, "latency": 1}, {"size": 1, "latency": 3}, {"size": 3, "latency": 3}],
...        ["size", "latency"])
[0, 1]
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdcompress.errors import KDCompressError
from kdcompress.fsutil import atomic_path, atomic_write_text, strict_json
from kdcompress.report import format_bytes
from kdcompress.search.space import Choice, Param

__all__ = ["TrialSummary", "FrontPoint", "SearchResult", "pareto", "write_best_file",
           "best_file_text", "load_front", "render_front", "summary", "FRONTIER_JSON",
           "FRONTIER_MD", "FRONTIER_PNG", "UNITS"]

FRONTIER_JSON, FRONTIER_MD, FRONTIER_PNG = "frontier.json", "frontier.md", "frontier.png"
#: How each objective is shown.
UNITS = {"size": "bytes", "latency": "ms"}


@dataclass
class TrialSummary:
    """One trial as the study recorded it.

    Attributes
    ----------
    number : int
        The trial's number in the study.
    state : str
        ``"complete"``, ``"pruned"``, ``"failed"``, ``"running"`` or ``"waiting"``.
    values : dict
        Its parameter values (the repr of a value that is not a plain number or string).
    objectives : dict, optional
        Objective values of the target stage, measured during the search.
    val_accuracy, baseline_val_accuracy : float, optional
        Validation accuracy of the target and of the baseline.
    drop : float, optional
        ``100 * (baseline_val_accuracy - val_accuracy)``: points lost on validation.
    feasible : bool
        Complete with ``drop`` within the budget.
    ran, cached : list of str
        Stages this trial computed, and stages it loaded from the run folder.
    seconds : float, optional
        Wall time of the trial.
    note : str
        Why it was pruned or failed, or which trial it repeats.
    default : bool
        The file's default pipeline (enqueued as the first trial).
    baseline_objectives : dict, optional
        The objective values of the baseline stage in this trial (for the plot).
    """

    number: int
    state: str
    values: dict[str, Any]
    objectives: dict[str, float] | None = None
    val_accuracy: float | None = None
    baseline_val_accuracy: float | None = None
    drop: float | None = None
    feasible: bool = False
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float | None = None
    note: str = ""
    default: bool = False
    baseline_objectives: dict[str, float] | None = None


@dataclass
class FrontPoint:
    """A Pareto-optimal trial, measured again with the test split read.

    Attributes
    ----------
    trial : int
        Its trial number.
    values : dict
        Its parameter values (as in :class:`TrialSummary`).
    objectives : dict
        Objective values measured during the search (what the front was chosen on).
    val_accuracy, drop : float
        Validation accuracy and points lost against the baseline, as in the search.
    accuracy : float
        Test accuracy of the target stage (read only once the search was over).
    agreement : float, optional
        Share of test samples on which it predicts the baseline's class.
    size_bytes : int
        Size on disk of the target.
    latency_ms : dict
        Latency of the target measured with the test inputs (``batch_1``, ``batch_64``).
    best_for : list of str
        The objectives this point is best at among the front.
    files : dict
        ``{"pipeline": "best-size.py", "onnx": "best-size.onnx"}`` for a best point.
    """

    trial: int
    values: dict[str, Any]
    objectives: dict[str, float]
    val_accuracy: float
    drop: float
    accuracy: float
    agreement: float | None
    size_bytes: int
    latency_ms: dict[str, dict[str, float]]
    best_for: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class SearchResult:
    """What a search found (``RUN/search/frontier.json``).

    Attributes
    ----------
    pipeline, data, target, baseline : str
        The pipeline, its data, the stage optimised and the stage it is compared with.
    objectives : tuple of str
        What is minimised (``"size"``: bytes on disk, ``"latency"``: ms at batch 64, median).
    max_drop : float
        The budget: validation accuracy points the target may lose against the baseline.
    trials : list of TrialSummary
        Every trial of the study.
    front : list of FrontPoint
        The Pareto front of the trials within the budget, measured on the test split, in order
        of the first objective.
    best : dict of str to int
        For each objective, the front's trial that is best at it.
    baseline_point, default_point : dict, optional
        The baseline stage and the file's default pipeline measured like the front (``trial``,
        ``values``, ``accuracy``, ``val_accuracy``, ``size_bytes``, ``latency_ms``).
    closest_miss : dict, optional
        When no trial met the budget: ``{"trial", "drop", "over"}`` for the closest one.
    pending : int
        Trials still running or waiting in other workers; the front is written by the last.
    notes : list of str
        What could not be done (a best file that could not be written, and why).
    """

    pipeline: str
    data: str
    target: str
    baseline: str
    objectives: tuple[str, ...]
    max_drop: float
    trials: list[TrialSummary]
    front: list[FrontPoint] = field(default_factory=list)
    best: dict[str, int] = field(default_factory=dict)
    baseline_point: dict[str, Any] | None = None
    default_point: dict[str, Any] | None = None
    closest_miss: dict[str, Any] | None = None
    pending: int = 0
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Trials per state."""
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def stage_counts(self) -> tuple[int, int]:
        """``(stages computed, stages loaded from the cache)`` over every trial."""
        return (sum(len(t.ran) for t in self.trials), sum(len(t.cached) for t in self.trials))

    def to_dict(self) -> dict[str, Any]:
        """The ``frontier.json`` document."""
        d = asdict(self)
        d["objectives"] = list(self.objectives)
        d["counts"] = self.counts()
        d["stages_run"], d["stages_cached"] = self.stage_counts()
        return strict_json(d)

    def save(self, folder: str | Path, *, plot_png: bool = True) -> None:
        """Write ``frontier.json``, ``frontier.md`` and (with ``plot_png``) ``frontier.png``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = self.to_dict()
        atomic_write_text(folder / FRONTIER_JSON, json.dumps(doc, indent=1, allow_nan=False))
        atomic_write_text(folder / FRONTIER_MD, markdown(doc))
        if plot_png:
            plot(doc, folder / FRONTIER_PNG)

    def summary(self) -> str:
        """One paragraph: trials, cache use, the budget, what was found."""
        return summary(self.to_dict())


def pareto(points: Sequence[Mapping[str, float]], objectives: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (all objectives minimised); of equal
    points the first is kept."""
    keep = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if j == i:
                continue
            no_worse = all(q[o] <= p[o] for o in objectives)
            better = any(q[o] < p[o] for o in objectives)
            if no_worse and (better or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


# -- text -------------------------------------------------------------------------------------

def _objective_text(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name == "size":
        return format_bytes(int(value))
    return f"{value:.3f} ms" if name == "latency" else f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def summary(doc: Mapping[str, Any]) -> str:
    """The paragraph of :meth:`SearchResult.summary`, from ``frontier.json``'s document."""
    counts = ", ".join(f"{n} {state}" for state, n in doc["counts"].items())
    lines = [f"{_plural(len(doc['trials']), 'trial')} ({counts}); stages computed "
             f"{doc['stages_run']}, loaded from the cache {doc['stages_cached']}."]
    if doc["pending"]:
        lines.append(f"{_plural(doc['pending'], 'trial')} still running or queued in other "
                     "workers: the last one to finish writes the front.")
    elif doc["front"]:
        lines.append(f"{_plural(len(doc['front']), 'trial')} on the front of "
                     f"{' and '.join(doc['objectives'])} within {doc['max_drop']:g} validation "
                     f"points of '{doc['baseline']}'.")
    elif doc["closest_miss"]:
        miss = doc["closest_miss"]
        lines.append(f"No trial met the budget of {doc['max_drop']:g} points: the closest, trial "
                     f"{miss['trial']}, lost {miss['drop']:.2f} validation points, "
                     f"{miss['over']:.2f} more than allowed.")
    else:
        lines.append("No trial completed: see the notes of the failed ones.")
    return " ".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def front_cells(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the front table (markdown and terminal)."""
    names = list(doc["trials"][0]["values"]) if doc["trials"] else []
    header = (["trial"] + names + ["val", "drop", "test", "agreement", "size", "b1 ms", "b64 ms",
                                   "best for"])
    rows = []
    for p in doc["front"]:
        lat = p["latency_ms"]
        rows.append([str(p["trial"])] + [_cell(p["values"].get(n, "")) for n in names] + [
            _percent(p["val_accuracy"]), f"{p['drop']:+.2f}", _percent(p["accuracy"]),
            _percent(p["agreement"]), format_bytes(p["size_bytes"]),
            f"{lat['batch_1']['p50']:.3f}" if "batch_1" in lat else "-",
            f"{lat['batch_64']['p50']:.3f}" if "batch_64" in lat else "-",
            ", ".join(p["best_for"])])
    for label, point in (("baseline", doc.get("baseline_point")),
                         ("default", doc.get("default_point"))):
        if point:
            lat = point["latency_ms"]
            rows.append([f"{label} ({point['trial']})"] + [
                _cell(point["values"].get(n, "")) for n in names] + [
                _percent(point["val_accuracy"]), "-" if point.get("drop") is None
                else f"{point['drop']:+.2f}", _percent(point["accuracy"]),
                _percent(point.get("agreement")), format_bytes(point["size_bytes"]),
                f"{lat['batch_1']['p50']:.3f}" if "batch_1" in lat else "-",
                f"{lat['batch_64']['p50']:.3f}" if "batch_64" in lat else "-", ""])
    return header, rows


def trial_cells(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table of every trial."""
    names = list(doc["trials"][0]["values"]) if doc["trials"] else []
    objectives = list(doc["objectives"])
    header = ["trial", "state"] + names + ["val", "drop"] + objectives + ["ran", "cached", "s",
                                                                            "note"]
    rows = []
    for t in doc["trials"]:
        obj = t["objectives"] or {}
        rows.append([str(t["number"]) + (" (default)" if t["default"] else ""), t["state"]]
                    + [_cell(t["values"].get(n, "")) for n in names]
                    + [_percent(t["val_accuracy"]),
                       "-" if t["drop"] is None else f"{t['drop']:+.2f}"]
                    + [_objective_text(o, obj.get(o)) for o in objectives]
                    + [str(len(t["ran"])), str(len(t["cached"])),
                       "-" if t["seconds"] is None else f"{t['seconds']:.1f}", t["note"]])
    return header, rows


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def markdown(doc: Mapping[str, Any]) -> str:
    """``frontier.md``: the front, then every trial."""
    objectives = ", ".join(f"{o} ({UNITS.get(o, '')})" for o in doc["objectives"])
    lines = [f"# search: {doc['pipeline']} on {doc['data']}", "",
             f"Objectives of stage '{doc['target']}', minimised: {objectives}. Budget: at most "
             f"{doc['max_drop']:g} points of validation accuracy below '{doc['baseline']}'.", "",
             summary(doc), ""]
    if doc["front"]:
        lines += ["## Front (test split read after the search)", ""]
        lines += _md_table(*front_cells(doc))
        lines += ["", "*val*, *drop*: validation accuracy and points lost against the baseline, "
                  "as in the search; *test*, *agreement*, *size* and latency were measured once "
                  "the search was over."]
        for objective, number in doc["best"].items():
            files = next(p["files"] for p in doc["front"] if p["trial"] == number)
            lines.append(f"- best {objective}: trial {number}"
                         + (f": `{files['pipeline']}`" if "pipeline" in files else "")
                         + (f", `{files['onnx']}`" if "onnx" in files else ""))
    for note in doc["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "## Trials", ""] + _md_table(*trial_cells(doc))
    return "\n".join(lines) + "\n"


def load_front(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN/search/frontier.json`` as a document, or ``None`` when the folder has no search.

    Raises
    ------
    KDCompressError
        The file exists but is not a search front.
    """
    path = Path(run_dir) / "search" / FRONTIER_JSON
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        for key in ("front", "trials", "objectives", "best", "pipeline"):
            doc[key]  # noqa: B018 - every key the tables read
    except (ValueError, KeyError, TypeError) as exc:
        raise KDCompressError(f"{path} is not a kdcompress search front: {exc}") from exc
    return doc


def render_front(doc: Mapping[str, Any]) -> Any:
    """The front (and the baseline and default rows) as a ``rich.table.Table``."""
    from rich.table import Table

    header, rows = front_cells(doc)
    table = Table(title=f"search front · {doc['pipeline']} · {doc['data']} · "
                        f"budget {doc['max_drop']:g} points")
    for h in header:
        table.add_column(h, justify="left" if h in ("trial", "best for") else "right")
    for r in rows:
        table.add_row(*r)
    return table


# -- the plot ---------------------------------------------------------------------------------

def plot(doc: Mapping[str, Any], path: Path) -> None:
    """``frontier.png``: every complete trial faint (a cross when it missed the budget), the
    front highlighted and joined, the baseline (star) and the default pipeline (diamond)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = list(doc["objectives"])
    done = [t for t in doc["trials"] if t["state"] == "complete" and t["objectives"]]
    front = {p["trial"] for p in doc["front"]}
    default = next((t for t in done if t["default"]), None)
    baseline = next((t.get("baseline_objectives") for t in doc["trials"]
                     if t.get("baseline_objectives")), None)
    panels = ([(objectives[0], objectives[1])] if len(objectives) >= 2 else []) + [
        (o, "drop") for o in objectives]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)

    def value(t: Mapping[str, Any], key: str) -> float:
        if key == "drop":
            return t["drop"]
        v = t["objectives"][key]
        return v / 1024 if key == "size" else v

    def label(key: str) -> str:
        return {"size": "size on disk (KiB)", "latency": "latency, batch 64 p50 (ms)",
                "drop": "validation points lost"}.get(key, key)

    for ax, (xkey, ykey) in zip(axes[0], panels, strict=True):
        ok = [t for t in done if t["feasible"]]
        miss = [t for t in done if not t["feasible"]]
        ax.scatter([value(t, xkey) for t in ok], [value(t, ykey) for t in ok], s=18,
                   color="0.6", alpha=0.45, label="trial within budget")
        ax.scatter([value(t, xkey) for t in miss], [value(t, ykey) for t in miss], s=18,
                   marker="x", color="0.6", alpha=0.45, label="trial over budget")
        best = sorted((t for t in done if t["number"] in front), key=lambda t: value(t, xkey))
        if best:
            if ykey != "drop":  # the front in objective space: a staircase
                ax.plot([value(t, xkey) for t in best], [value(t, ykey) for t in best],
                        drawstyle="steps-post", color="tab:red", lw=1.2, zorder=2)
            ax.scatter([value(t, xkey) for t in best], [value(t, ykey) for t in best], s=46,
                       color="tab:red", zorder=3, label="front")
            for t in best:
                ax.annotate(str(t["number"]), (value(t, xkey), value(t, ykey)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        if default is not None:
            ax.scatter([value(default, xkey)], [value(default, ykey)], s=70, marker="D",
                       facecolors="none", edgecolors="tab:blue", lw=1.5, zorder=4,
                       label=f"default (trial {default['number']})")
        if baseline is not None and ykey != "drop":
            ax.scatter([value({"objectives": baseline}, xkey)],
                       [value({"objectives": baseline}, ykey)], s=110, marker="*",
                       color="tab:green", zorder=4, label=f"baseline '{doc['baseline']}'")
        if ykey == "drop":
            ax.axhline(doc["max_drop"], color="tab:orange", ls="--", lw=1,
                       label=f"budget {doc['max_drop']:g} points")
        for axis, key in ((ax.xaxis, xkey), (ax.yaxis, ykey)):
            if key != "drop":
                _log_axis(ax, axis, [value(t, key) for t in done])
        ax.set_xlabel(label(xkey))
        ax.set_ylabel(label(ykey))
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    for h, lab in zip(*axes[0][0].get_legend_handles_labels(), strict=True):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
               frameon=False)
    fig.suptitle(f"search: {doc['pipeline']} on {doc['data']}, stage '{doc['target']}' "
                 f"({len(doc['trials'])} trials)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    tmp = atomic_path(path)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _log_axis(ax: Any, axis: Any, values: list[float]) -> None:
    """A log scale with plain tick labels (minor ones too when the values span under 20x)."""
    import matplotlib.ticker

    (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    positive = [v for v in values if v > 0]
    narrow = bool(positive) and max(positive) / min(positive) < 20
    axis.set_minor_formatter(plain if narrow else matplotlib.ticker.NullFormatter())


# -- best-<objective>.py ----------------------------------------------------------------------

def best_file_text(params: Mapping[str, Param], values: Mapping[str, Any], *,
                   header: Sequence[str] = ()) -> tuple[Path, str]:
    """The source of the pipeline file the parameters were written in, with each parameter's
    call replaced by the source of its value.

    A value chosen from a list written in the call (``ks.choice([KD(4), DKD()])``) is replaced
    by that element's own source; any other value by its ``repr``, which must read back as the
    same literal. Everything else in the file (comments, layout, other code) is kept.

    Returns
    -------
    (Path, str)
        The original file and the new source (``header`` lines first, as comments).

    Raises
    ------
    KDCompressError
        The parameters were not all written in one file, a call cannot be found in it (the file
        changed since it was loaded), or a value has no source to write.
    """
    files = {Path(p.position.file).resolve() if p.position else None for p in params.values()}
    if len(files) != 1 or None in files:
        raise KDCompressError("the search parameters were not all written in one pipeline file "
                              f"({', '.join(sorted(str(f) for f in files))}), so no file can be "
                              "rewritten with the chosen values")
    path = files.pop()
    assert path is not None
    if not path.is_file():
        raise KDCompressError(f"the search parameters were written in {path}, which is not a "
                              "file (an interactive session?): no file can be rewritten")
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError) as exc:
        raise KDCompressError(f"the search parameters were written in {path}, which cannot be "
                              f"read back as Python ({type(exc).__name__}): no file can be "
                              "rewritten") from exc
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits: dict[tuple[int, int], tuple[int, str]] = {}
    for name, param in params.items():
        node = _find_call(calls, param, path)
        start = _index(lines, offsets, node.lineno, node.col_offset)
        end = _index(lines, offsets, node.end_lineno or node.lineno, node.end_col_offset or 0)
        text = _value_source(param, values[name], node, source, name)
        if (start, end) in edits and edits[(start, end)][1] != text:
            raise KDCompressError(f"{path}:{node.lineno}: one search parameter call stands for "
                                  f"several parameters with different values ({name}); write "
                                  "one call per parameter")
        edits[(start, end)] = (end, text)
    out = source
    for (start, end), (_, text) in sorted(edits.items(), reverse=True):
        out = out[:start] + text + out[end:]
    ast.parse(out)  # the replacement is valid Python
    return path, "".join(f"# {h}\n" for h in header) + out


def write_best_file(target: Path, params: Mapping[str, Param], values: Mapping[str, Any], *,
                    header: Sequence[str] = ()) -> Path:
    """Write :func:`best_file_text` to ``target`` atomically; return the original file."""
    path, text = best_file_text(params, values, header=header)
    atomic_write_text(target, text)
    return path


def _find_call(calls: list[ast.Call], param: Param, path: Path) -> ast.Call:
    pos = param.position
    assert pos is not None
    if pos.col is not None:
        found = [c for c in calls if (c.lineno, c.col_offset, c.end_lineno, c.end_col_offset)
                 == (pos.line, pos.col, pos.end_line, pos.end_col)]
    else:  # Python 3.10 records lines only: the one call of choice/int/float on that line
        found = [c for c in calls if c.lineno == pos.line and _callee(c) in ("choice", "int",
                                                                              "float")]
    if len(found) != 1:
        raise KDCompressError(f"{path}:{pos.line}: cannot find the call that created {param!r} "
                              "(the file changed since it was loaded, or several search "
                              "parameters share the line)")
    return found[0]


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _index(lines: list[str], offsets: list[int], lineno: int, col: int) -> int:
    """String index of an :mod:`ast` position (1-based line, column in UTF-8 bytes)."""
    line = lines[lineno - 1]
    return offsets[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8"))


def _value_source(param: Param, value: Any, call: ast.Call, source: str, name: str) -> str:
    if isinstance(param, Choice):
        listed = call.args[0] if call.args else next(
            (k.value for k in call.keywords if k.arg == "values"), None)
        if isinstance(listed, (ast.List, ast.Tuple)) and len(listed.elts) == len(param.values) \
                and not any(isinstance(e, ast.Starred) for e in listed.elts):
            segment = ast.get_source_segment(source, listed.elts[param.index(value)])
            if segment is not None:
                return segment
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value and type(ast.literal_eval(text)) is type(value)
    except (ValueError, SyntaxError):
        same = False
    if not same or (isinstance(value, float) and not math.isfinite(value)):
        raise KDCompressError(f"search parameter '{name}' chose {text}, which cannot be written "
                              "as a literal; list the values in the ks.choice([...]) call itself")
    return text
