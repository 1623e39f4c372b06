"""The per-stage report: ``report.json``, ``report.md``, ``report.png`` and the terminal table.

Every row carries its ratios to the baseline (the teacher): how many times smaller on disk and how
many times faster at batch 1 and batch 64. Rows are also checked for compression that bought
nothing: MACs or parameters down by more than 20% with latency down by less than 5%, a compressing
stage whose size on disk did not drop, an int8 model no faster than its fp32 parent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdcompress.errors import KDCompressError
from kdcompress.fsutil import atomic_path, atomic_write_text

__all__ = ["Report", "load_report", "render_table", "format_bytes"]

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
class Report:
    """What a run measured, stage by stage, in execution order."""

    pipeline: str
    device: str = "cpu"
    world_size: int = 1
    data: str = ""
    threads: int = 1
    baseline: str | None = None
    edges: list[list[str]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, Any] | None = None

    def row(self, name: str) -> dict[str, Any] | None:
        """The row of stage ``name``, if it ran."""
        return next((r for r in self.stages if r["name"] == name), None)

    def add(self, row: dict[str, Any]) -> None:
        """Append a stage's measurements, adding its ratios to the baseline and its flags."""
        base = self.row(self.baseline) if self.baseline != row["name"] else row
        lat = row["latency_ms"]
        if base is not None:
            blat = base["latency_ms"]
            row["smaller_by"] = _ratio(base["size_bytes"], row["size_bytes"])
            row["faster_by"] = {k: _ratio(blat[k]["p50"], lat[k]["p50"]) for k in lat if k in blat}
        else:
            row["smaller_by"], row["faster_by"] = None, None
        parent = self.row(row["inputs"][0]) if row["inputs"] else None
        row["flags"] = _flags(row, parent)
        self.stages = [r for r in self.stages if r["name"] != row["name"]] + [row]

    def fail(self, name: str, function: str, message: str, seconds: float) -> None:
        """Record the stage that failed and why."""
        self.failed = {"name": name, "function": function, "error": message,
                       "seconds": round(seconds, 3)}

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` document."""
        return asdict(self)

    # -- files ------------------------------------------------------------------------------

    def save(self, run_dir: str | Path) -> None:
        """Write ``report.json``, ``report.md`` and ``report.png`` into ``run_dir`` atomically."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / REPORT_JSON, json.dumps(self.to_dict(), indent=1,
                                                            default=str))
        atomic_write_text(run_dir / REPORT_MD, self.markdown())
        if self.stages:
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
                     "baseline (faster at batch 1 / batch 64).")
        for r in self.stages:
            notes = [f"- {f}" for f in r.get("flags", [])] + [
                f"- warning: {w}" for w in r.get("warnings", [])]
            details = r.get("details") or {}
            if notes or details:
                lines += ["", f"## {r['name']}", ""] + notes
                for key, value in details.items():
                    lines.append(f"- {key}: `{json.dumps(value, default=str)}`")
        if self.failed:
            lines += ["", f"## FAILED: {self.failed['name']}", "", f"```\n{self.failed['error']}"
                      "\n```"]
        return "\n".join(lines) + "\n"


def _flags(row: dict[str, Any], parent: dict[str, Any] | None) -> list[str]:
    if parent is None:
        return []
    flags = []
    lat = row["latency_ms"].get("batch_64", row["latency_ms"].get("batch_1"))
    plat = parent["latency_ms"].get("batch_64", parent["latency_ms"].get("batch_1"))
    speedup = (plat["p50"] / lat["p50"]) if lat and plat and lat["p50"] > 0 else None
    for key, label in (("macs", "MACs"), ("params", "parameters")):
        if row.get(key) and parent.get(key) and row[key] < 0.8 * parent[key]:
            if speedup is not None and speedup < 1.05:
                flags.append(f"{label} fell {100 * (1 - row[key] / parent[key]):.0f}% but "
                             f"latency (largest batch) improved only {100 * (speedup - 1):.1f}%")
            break
    compressing = row["params"] < parent["params"] or "quantize" in row["function"]
    if compressing and row["size_bytes"] >= parent["size_bytes"]:
        flags.append(f"size on disk did not drop ({format_bytes(row['size_bytes'])} vs "
                     f"{format_bytes(parent['size_bytes'])})")
    if "quantize" in row["function"] and speedup is not None and speedup < 1.0:
        reason = (row.get("details") or {}).get("slow_reason", "")
        flags.append(f"int8 is not faster than its fp32 parent at the largest batch "
                     f"({speedup:.2f}x)" + (f": {reason}" if reason else ""))
    return flags


def table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the per-stage table (shared by markdown and terminal)."""
    header = ["stage", "function", "format", "params", "size", "MACs", "b1 ms p50/p90",
              "b64 ms p50/p90", "engine", "accuracy", "agreement", "smaller", "faster b1/b64",
              "time s", "cached"]
    rows = []
    for r in report.stages:
        lat = r["latency_ms"]

        def ms(key: str, lat: dict = lat) -> str:
            v = lat.get(key)
            return f"{v['p50']:.3f} / {v['p90']:.3f}" if v else "-"

        fb = r.get("faster_by") or {}
        faster = "/".join(f"{fb[k]:.2f}x" if fb.get(k) else "-" for k in ("batch_1", "batch_64"))
        rows.append([
            r["name"], r["function"].rsplit(".", 1)[-1], r["format"], _count(r["params"]),
            format_bytes(r["size_bytes"]), _count(r.get("macs")), ms("batch_1"), ms("batch_64"),
            r["engine"], f"{100 * r['accuracy']:.2f}%",
            "-" if r.get("agreement") is None else f"{100 * r['agreement']:.2f}%",
            f"{r['smaller_by']:.1f}x" if r.get("smaller_by") else "-", faster,
            f"{r['seconds']:.1f}", "yes" if r["cached"] else "no",
        ])
    return header, rows


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
    """Accuracy against size and against latency, one point per stage, DAG edges drawn."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["name"]: r for r in report.stages}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("size on disk (KiB)", lambda r: r["size_bytes"] / 1024),
              ("latency, batch 64 p50 (ms)",
               lambda r: r["latency_ms"].get("batch_64", r["latency_ms"]["batch_1"])["p50"])]
    for ax, (label, xval) in zip(axes, panels, strict=True):
        for a, b in report.edges:
            if a in rows and b in rows:
                ax.annotate("", xy=(xval(rows[b]), 100 * rows[b]["accuracy"]),
                            xytext=(xval(rows[a]), 100 * rows[a]["accuracy"]),
                            arrowprops={"arrowstyle": "->", "color": "0.6"})
        for name, r in rows.items():
            marker = "s" if r["format"] == "onnx" else "o"
            ax.scatter(xval(r), 100 * r["accuracy"], marker=marker, s=40, zorder=3)
            ax.annotate(name, (xval(r), 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        values = [xval(r) for r in rows.values()]
        narrow = max(values) / max(min(values), 1e-9) < 20  # label minor ticks within a decade
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
                                     if narrow else matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{report.pipeline} on {report.data} (circle: torch, square: ONNX)")
    fig.tight_layout()
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
        return Report(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise KDCompressError(f"{path} is not a kdcompress report: {exc}") from exc
