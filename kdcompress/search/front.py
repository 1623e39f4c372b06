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

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdcompress.errors import KDCompressError
from kdcompress.fsutil import atomic_write_text, strict_json
from kdcompress.report import format_bytes

__all__ = ["TrialSummary", "FrontPoint", "SearchResult", "pareto", "load_front", "render_front",
           "summary", "markdown", "FRONTIER_JSON", "FRONTIER_MD", "FRONTIER_PNG", "UNITS"]

FRONTIER_JSON, FRONTIER_MD, FRONTIER_PNG = "frontier.json", "frontier.md", "frontier.png"
#: How each objective is shown.
UNITS = {"size": "bytes", "latency": "ms", "latency_b1": "ms",
         "accuracy": "validation points below the baseline"}


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
        Objective values of the target stage: measured during the search, with the latencies
        timed again side by side once the trials were over for the trials within the budget
        (what the front was chosen on).
    search_objectives : dict, optional
        The trial's own objective values where the latencies were timed again.
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
    search_objectives: dict[str, float] | None = None


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
        What the front was chosen on: the objective values of the search, latencies timed again
        side by side with the other trials within the budget (see ``SearchResult.retimed``).
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
    files : list of str
        The files written for it in ``RUN/search/`` (``best-size.py``, ``best-size.onnx``, and
        the latency ones when it is best at both).
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
    files: list[str] = field(default_factory=list)


@dataclass
class SearchResult:
    """What a search found (``RUN/search/frontier.json``).

    Attributes
    ----------
    pipeline, data, target, baseline : str
        The pipeline, its data, the stage optimised and the stage it is compared with.
    objectives : tuple of str
        What is minimised (``"size"``: bytes on disk, ``"latency"``: ms at batch 64, median,
        ``"latency_b1"``: ms at batch 1, median, ``"accuracy"``: validation points below the
        baseline).
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
    retimed : dict, optional
        The re-timing of the trials within the budget before the front was chosen: ``models``,
        ``rounds``, ``seconds``, ``load`` (the load average), ``spread`` (the most any model's
        rounds disagreed, slowest over fastest), ``tolerance`` (the front's latency tolerance),
        ``noisy`` when the spread exceeded the tolerance, and the trials it moved onto
        (``joined``) and off (``left``) the front; ``{"note": ...}`` when it could not be done.
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
    retimed: dict[str, Any] | None = None

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
            from kdcompress.search.plot import plot

            plot(doc, folder / FRONTIER_PNG)

    def summary(self) -> str:
        """One paragraph: trials, cache use, the budget, what was found."""
        return summary(self.to_dict())


def pareto(points: Sequence[Mapping[str, float]], objectives: Sequence[str], *,
           tolerance: float = 0.0) -> list[int]:
    """Indices of the points no other point dominates, all objectives minimised.

    Parameters
    ----------
    points : sequence of mapping
        Each point's objective values.
    objectives : sequence of str
        The objectives compared.
    tolerance : float
        Relative tolerance on the latency objectives (names starting with ``latency``): a point
        within a factor ``1 + tolerance`` of another's latency is no worse than it there, so
        two points whose timings differ by less than the timing's noise are told apart by
        their other objectives. Sizes are exact. With 0 this is plain Pareto dominance.

    Returns
    -------
    list of int
        In ascending order. A point leaves the front when a kept point is no worse on every
        objective (within the tolerance on latencies) and strictly lower on one. Points are
        taken in ascending order of their objectives (then index), and a kept point is never
        dropped, so the front is never empty for a non-empty input; of equal points the first
        is kept.

    >>> pareto([{"size": 1, "latency": 1.03}, {"size": 2, "latency": 1.0}], ["size", "latency"],
    ...        tolerance=0.05)
    [0]
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, but got {tolerance!r}")
    slack = {o: 1 + tolerance if o.startswith("latency") else 1.0 for o in objectives}

    def dominates(q: Mapping[str, float], p: Mapping[str, float]) -> bool:
        return all(q[o] <= p[o] * slack[o] for o in objectives) and \
            any(q[o] < p[o] for o in objectives)

    order = sorted(range(len(points)),
                   key=lambda i: (tuple(points[i][o] for o in objectives), i))
    kept: list[int] = []
    for i in order:
        if not any(dominates(points[j], points[i]) or
                   all(points[j][o] == points[i][o] for o in objectives) for j in kept):
            kept.append(i)
    return sorted(kept)


# -- text -------------------------------------------------------------------------------------

def _objective_text(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name == "size":
        return format_bytes(int(value))
    if name == "accuracy":
        return f"{value:+.2f}"
    return f"{value:.3f} ms" if name.startswith("latency") else f"{value:.4g}"


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
    retimed = doc.get("retimed") or {}
    if "models" in retimed:
        moved = [f"{_plural(len(retimed[k]), 'trial')} {', '.join(map(str, retimed[k]))} {w}"
                 for k, w in (("joined", "onto it"), ("left", "off it")) if retimed[k]]
        lines.append(f"The front was chosen on the latencies of the {retimed['models']} models "
                     f"within the budget timed again side by side ({retimed['rounds']} rounds, "
                     f"{retimed['seconds']:.0f} s"
                     + (f"; rounds within {retimed['spread']:.2f}x, latencies within "
                        f"{retimed['tolerance']:.0%} counted equal" if "spread" in retimed else "")
                     + "); "
                     + ("that moved " + " and ".join(moved) if moved
                        else "that moved no trial onto or off it") + ".")
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
    # a latency timed again before the front was chosen shows the trial's own timing beside it
    header = ["trial", "state"] + names + ["val", "drop"] + objectives + ["ran", "cached", "s",
                                                                            "note"]
    rows = []
    for t in doc["trials"]:
        obj = t["objectives"] or {}
        own = t.get("search_objectives") or {}
        rows.append([str(t["number"]) + (" (default)" if t["default"] else ""), t["state"]]
                    + [_cell(t["values"].get(n, "")) for n in names]
                    + [_percent(t["val_accuracy"]),
                       "-" if t["drop"] is None else f"{t['drop']:+.2f}"]
                    + [_objective_text(o, obj.get(o))
                       + (f" (trial: {_objective_text(o, own[o])})"
                          if o in own and own[o] != obj.get(o) else "")
                       for o in objectives]
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
            mine = [f"`{f}`" for f in files if f.startswith(f"best-{objective}.")]
            lines.append(f"- best {objective}: trial {number}"
                         + (f": {', '.join(mine)}" if mine else ""))
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
