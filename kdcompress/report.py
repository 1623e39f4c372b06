"""The per-stage report: ``report.json``, ``report.md``, ``report.png`` and the terminal table.

Every row carries its ratios to the baseline (the teacher): how many times smaller on disk and how
many times faster at batch 1 and batch 64. Rows are also checked for compression that bought
nothing: MACs or parameters down by more than 20% with latency down by less than 5%, a compressing
stage whose size on disk did not drop, an int8 model no faster than its fp32 parent.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kdcompress.errors import KDCompressError
from kdcompress.fsutil import atomic_path, atomic_write_text, strict_json

__all__ = ["Report", "StageRow", "load_report", "render_table", "format_bytes"]

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 3)


@dataclass
class StageRow:
    """One stage's measurements, as one entry of ``report.json``'s ``stages``.

    ``latency_ms`` maps ``"batch_1"`` / ``"batch_64"`` to ``{"p50", "p90", "runs"}`` in
    milliseconds; ``smaller_by`` and ``faster_by`` are ratios to the baseline (the latter timed
    interleaved with it); ``val_accuracy`` is on the validation split (what automatic choices
    use), ``accuracy`` on the test split (reported only; ``None`` while a search must leave the
    test split unread, as is ``agreement``); both are top-1 accuracy whatever the metric.
    ``val_score`` and ``score`` are the pipeline's metric (``Report.metric``: ``"accuracy"``,
    ``"top5"``, ``"macro_f1"`` or a callable's name) on the same splits, which automatic choices
    use; equal to the accuracies when the metric is ``"accuracy"``. ``seconds`` is the stage's
    own work (a stage loaded from the cache keeps the seconds it took when it was computed),
    ``measure_seconds`` the time this run spent measuring it (scores and latencies).
    """

    name: str
    function: str
    inputs: list[str]
    format: str
    params: int
    size_bytes: int
    macs: int | None
    latency_ms: dict[str, dict[str, float]]
    engine: str
    accuracy: float | None
    agreement: float | None = None
    val_accuracy: float | None = None
    seconds: float = 0.0
    cached: bool = False
    role: str = "transform"
    smaller_by: float | None = None
    faster_by: dict[str, float | None] | None = None
    flags: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    latency_ms_cuda: dict[str, dict[str, float]] | None = None
    score: float | None = None
    val_score: float | None = None
    measure_seconds: float = 0.0

    def __post_init__(self) -> None:
        # a row without scores (a report written before metrics had names, or built by hand)
        # was scored by top-1 accuracy
        if self.score is None and self.val_score is None:
            self.score, self.val_score = self.accuracy, self.val_accuracy

    def to_dict(self) -> dict[str, Any]:
        """The row as ``report.json`` stores it (``latency_ms_cuda`` only when measured)."""
        d = asdict(self)
        if d["latency_ms_cuda"] is None:
            del d["latency_ms_cuda"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRow:
        """Rebuild a row from ``report.json``; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TypeError(f"unknown stage fields {sorted(unknown)}")
        return cls(**d)

    def batch_latency(self) -> dict[str, float] | None:
        """Latency at the largest batch timed (``batch_64`` when there is one)."""
        return self.latency_ms.get("batch_64", self.latency_ms.get("batch_1"))


@dataclass
class Report:
    """What a run measured, stage by stage, in execution order."""

    pipeline: str
    device: str = "cpu"
    world_size: int = 1
    data: str = ""
    threads: int = 1
    baseline: str | None = None
    edges: list[list[str]] = field(default_factory=list)
    stages: list[StageRow] = field(default_factory=list)
    failed: dict[str, Any] | None = None
    #: The name of the pipeline's metric (the rows' ``score`` / ``val_score``).
    metric: str = "accuracy"

    def row(self, name: str) -> StageRow | None:
        """The row of stage ``name``, if it ran."""
        return next((r for r in self.stages if r.name == name), None)

    def add(self, row: StageRow, *, order: list[str] | None = None) -> None:
        """Add a stage's measurements with its ratios to the baseline and its flags.

        A row for the same stage replaces the old one; with ``order`` (the pipeline's stage
        order) rows are kept in that order, so a partial run updates the report in place.
        """
        base = self.row(self.baseline) if self.baseline != row.name else row
        if base is not None:
            row.smaller_by = _ratio(base.size_bytes, row.size_bytes)
            if row.faster_by is None:
                blat = base.latency_ms
                row.faster_by = {k: _ratio(blat[k]["p50"], v["p50"])
                                 for k, v in row.latency_ms.items() if k in blat}
        parent = self.row(row.inputs[0]) if row.inputs else None
        row.flags = _flags(row, parent, self.metric)
        rows = [r for r in self.stages if r.name != row.name] + [row]
        if order is not None:
            rank = {name: i for i, name in enumerate(order)}
            rows.sort(key=lambda r: rank.get(r.name, len(rank)))
        self.stages = rows

    def fail(self, name: str, function: str, message: str, seconds: float) -> None:
        """Record the stage that failed and why."""
        self.failed = {"name": name, "function": function, "error": message,
                       "seconds": round(seconds, 3)}

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` document."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stages"] = [r.to_dict() for r in self.stages]
        return d

    # -- files ------------------------------------------------------------------------------

    def save(self, run_dir: str | Path, *, plot_png: bool = True) -> None:
        """Write ``report.json``, ``report.md`` and (with ``plot_png``) ``report.png`` atomically.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / REPORT_JSON, json.dumps(strict_json(self.to_dict()),
                                                            indent=1, allow_nan=False))
        atomic_write_text(run_dir / REPORT_MD, self.markdown())
        if plot_png and self.stages:
            plot(self, run_dir / REPORT_PNG)

    def markdown(self) -> str:
        """The report as a markdown document (table, per-stage details, flags, failure)."""
        lines = [f"# {self.pipeline}", "",
                 f"data: {self.data} · device: {self.device} · latency threads: {self.threads}"
                 f" · baseline: {self.baseline}", ""]
        header, rows = table_cells(self)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
        lines.append("Latency in ms, median / p90. *smaller* and *faster* are ratios to the "
                     "baseline (faster at batch 1 / batch 64, timed side by side with it, in "
                     "turns of consecutive runs). "
                     + ("*val* is validation accuracy, *accuracy* test accuracy."
                        if self.metric == "accuracy" else
                        f"*val {self.metric}* and *{self.metric}* are the pipeline's metric on "
                        "the validation and test splits, *accuracy* test top-1 accuracy.")
                     + f" *time s* is each stage's own work; measuring the stages took "
                     f"{sum(r.measure_seconds for r in self.stages):.1f} s in all.")
        for r in self.stages:
            notes = [f"- {f}" for f in r.flags] + [f"- warning: {w}" for w in r.warnings]
            if notes or r.details:
                lines += ["", f"## {r.name}", ""] + notes
                for key, value in r.details.items():
                    lines.append(f"- {key}: `{json.dumps(strict_json(value))}`")
        if self.failed:
            lines += ["", f"## FAILED: {self.failed['name']}", "", f"```\n{self.failed['error']}"
                      "\n```"]
        return "\n".join(lines) + "\n"


#: Accuracy a stage may lose against its input before the report flags it (points).
ACCURACY_DROP_POINTS = 2.0
#: What usually wins lost accuracy back, by stage role.
_KNOBS = {
    "train": "train for more epochs or lower lr",
    "distill": "distill for more epochs (or raise lr, or add CE() to the loss)",
    "decompose": "raise rank, or distill after decomposing",
    "prune": "raise recovery_epochs, or lower ratio",
    "export": "check the export's parity details",
    "quantize": "quantize fewer nodes (max_drop=) or calibrate on more samples",
    "transform": "check the stage's settings",
}


def _flags(row: StageRow, parent: StageRow | None, metric: str = "accuracy") -> list[str]:
    flags = list(row.timing.get("flags", []))
    if row.timing.get("cuda"):
        flags.append(row.timing["cuda"])
    if parent is None:
        return flags
    lat, plat = row.batch_latency(), parent.batch_latency()
    speedup = (plat["p50"] / lat["p50"]) if lat and plat and lat["p50"] > 0 else None
    for value, pvalue, label in ((row.macs, parent.macs, "MACs"),
                                 (row.params, parent.params, "parameters")):
        if value and pvalue and value < 0.8 * pvalue:
            if speedup is not None and speedup < 1.05:
                flags.append(f"{label} fell {100 * (1 - value / pvalue):.0f}% but "
                             f"latency (largest batch) improved only {100 * (speedup - 1):.1f}%")
            break
    quantized = row.role == "quantize"
    if (row.params < parent.params or quantized) and row.size_bytes >= parent.size_bytes:
        flags.append(f"size on disk did not drop ({format_bytes(row.size_bytes)} vs "
                     f"{format_bytes(parent.size_bytes)})")
    if quantized and speedup is not None and speedup < 1.0:
        reason = row.details.get("slow_reason", "")
        flags.append(f"int8 is not faster than its fp32 parent at the largest batch "
                     f"({speedup:.2f}x)" + (f": {reason}" if reason else ""))
    slower = _slower_on_cuda(row, parent) if quantized else None
    if slower:
        flags.append(slower)
    mine, theirs, split = row.val_score, parent.val_score, "validation"
    if mine is None or theirs is None:
        mine, theirs, split = row.score, parent.score, "test"
    drop = None if mine is None or theirs is None else 100 * (theirs - mine)
    if drop is not None and drop > ACCURACY_DROP_POINTS:
        flags.append(f"{split} {metric} fell {drop:.1f} points below '{parent.name}' "
                     f"({100 * mine:.2f}% vs {100 * theirs:.2f}%): "
                     f"{_KNOBS.get(row.role, _KNOBS['transform'])}")
    return flags


#: How much slower on CUDA than its fp32 parent an int8 graph must be to be flagged: the two are
#: timed one after the other, not side by side, so a smaller gap can be the machine's.
CUDA_SLOWER = 1.10


def _slower_on_cuda(row: StageRow, parent: StageRow) -> str | None:
    """A note when an int8 graph runs slower than its parent on the GPU at every batch timed."""
    mine, theirs = row.latency_ms_cuda or {}, parent.latency_ms_cuda or {}
    batches = [k for k in mine if k in theirs and theirs[k]["p50"] > 0]
    ratios = {k: mine[k]["p50"] / theirs[k]["p50"] for k in batches}
    if not ratios or min(ratios.values()) < CUDA_SLOWER:
        return None
    said = ", ".join(f"{k.replace('batch_', 'batch ')} {mine[k]['p50']:.3f} vs "
                     f"{theirs[k]['p50']:.3f} ms" for k in batches)
    return (f"on CUDA, int8 is slower than its fp32 parent ({said}; ONNX Runtime's CUDA "
            "provider): on a GPU serve the fp32 graph, or an int8 engine such as TensorRT's")


def table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the per-stage table (shared by markdown and terminal)."""
    named = report.metric != "accuracy"  # columns named after the metric, then top-1 accuracy
    scores = [f"val {report.metric}", report.metric, "accuracy"] if named else ["val", "accuracy"]
    header = ["stage", "function", "format", "params", "size", "MACs", "b1 ms p50/p90",
              "b64 ms p50/p90", "engine", *scores, "agreement", "smaller", "faster b1/b64",
              "time s", "cached"]
    rows = []
    for r in report.stages:
        def ms(key: str, lat: dict = r.latency_ms) -> str:
            v = lat.get(key)
            return f"{v['p50']:.3f} / {v['p90']:.3f}" if v else "-"

        fb = r.faster_by or {}
        faster = "/".join(f"{fb[k]:.2f}x" if fb.get(k) else "-" for k in ("batch_1", "batch_64"))
        rows.append([
            r.name, r.function.rsplit(".", 1)[-1], r.format, _count(r.params),
            format_bytes(r.size_bytes), _count(r.macs), ms("batch_1"), ms("batch_64"),
            r.engine, *([_percent(r.val_score), _percent(r.score), _percent(r.accuracy)]
                        if named else [_percent(r.val_accuracy), _percent(r.accuracy)]),
            _percent(r.agreement),
            f"{r.smaller_by:.1f}x" if r.smaller_by else "-", faster,
            f"{r.seconds:.1f}", "yes" if r.cached else "no",
        ])
    return header, rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render_table(report: Report) -> Any:
    """The per-stage table as a ``rich.table.Table``."""
    from rich.table import Table

    header, rows = table_cells(report)
    table = Table(title=f"{report.pipeline} · {report.data} · {report.device}", show_lines=False)
    for h in header:
        table.add_column(h, justify="left" if h in ("stage", "function", "format", "engine")
                         else "right", no_wrap=h in ("stage", "b1 ms p50/p90", "b64 ms p50/p90"))
    for r in rows:
        table.add_row(*r)
    if report.failed:
        table.caption = f"[red]FAILED at '{report.failed['name']}': {report.failed['error']}"
    return table


def plot(report: Report, path: Path) -> None:
    """Accuracy change against size and against latency, one point per stage, DAG edges drawn.

    The y axis is the test accuracy's change from the baseline in points on a symmetric-log
    scale: linear within one point (tenths stay visible), logarithmic beyond (a stage that loses
    70 points still fits). Stages are told apart by colour and the legend, so no label overlaps.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r.name: r for r in report.stages}
    base = rows.get(report.baseline or "") or next(iter(rows.values()))
    # the metric on the test split; on validation for a run that left the test split unread
    test = all(r.score is not None for r in rows.values())
    split = "test" if test else "validation"

    def score(r: StageRow) -> float:
        value = r.score if test else r.val_score
        return math.nan if value is None else value

    def change(r: StageRow) -> float:
        return 100 * (score(r) - score(base))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = [("size on disk (KiB)", lambda r: r.size_bytes / 1024),
              ("latency, batch 64 p50 (ms)", lambda r: r.batch_latency()["p50"])]
    colours = plt.get_cmap("tab10")
    for ax, (label, xval) in zip(axes, panels, strict=True):
        for a, b in report.edges:
            if a in rows and b in rows:
                ax.annotate("", xy=(xval(rows[b]), change(rows[b])),
                            xytext=(xval(rows[a]), change(rows[a])),
                            arrowprops={"arrowstyle": "->", "color": "0.7"})
        for i, (name, r) in enumerate(rows.items()):
            ax.scatter(xval(r), change(r), marker="s" if r.format == "onnx" else "o", s=50,
                       zorder=3, color=colours(i % 10),
                       label=f"{name} ({100 * score(r):.2f}%)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        values = [xval(r) for r in rows.values()]
        narrow = max(values) / max(min(values), 1e-9) < 20  # label minor ticks within a decade
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
                                     if narrow else matplotlib.ticker.NullFormatter())
        ax.set_yscale("symlog", linthresh=1.0, linscale=2.0)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+.1f}"))
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{split} {report.metric} vs {base.name} (points)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
               frameon=False)
    fig.suptitle(f"{report.pipeline} on {report.data} (circle: torch, square: ONNX)")
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    tmp = atomic_path(path)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def load_report(run_dir: str | Path) -> Report:
    """Read ``RUN_DIR/report.json`` back into a :class:`Report`."""
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise KDCompressError(f"no report in {run_dir}: expected {path} (run "
                              "'kdcompress run FILE --out DIR' first)")
    try:
        doc = json.loads(path.read_text())
        doc["stages"] = [StageRow.from_dict(r) for r in doc.get("stages", [])]
        return Report(**doc)
    except (ValueError, TypeError, AttributeError) as exc:
        raise KDCompressError(f"{path} is not a kdcompress report: {exc}") from exc
