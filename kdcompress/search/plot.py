"""``frontier.png``: the trials of a search in objective space, the front highlighted."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcompress.fsutil import atomic_path

__all__ = ["plot"]


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
        (o, "drop") for o in objectives if o != "accuracy"]  # accuracy is the drop itself
    if not panels:
        panels = [("accuracy", "drop")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)

    def value(t: Mapping[str, Any], key: str) -> float:
        if key == "drop":
            return t["drop"]
        v = t["objectives"][key]
        return v / 1024 if key == "size" else v

    def label(key: str) -> str:
        return {"size": "size on disk (KiB)", "latency": "latency, batch 64 p50 (ms)",
                "latency_b1": "latency, batch 1 p50 (ms)",
                "drop": "validation points lost",
                "accuracy": "validation points lost"}.get(key, key)

    for ax, (xkey, ykey) in zip(axes[0], panels, strict=True):
        ok = [t for t in done if t["feasible"]]
        miss = [t for t in done if not t["feasible"]]
        ax.scatter([value(t, xkey) for t in ok], [value(t, ykey) for t in ok], s=18,
                   color="0.6", alpha=0.45, label="trial within budget")
        ax.scatter([value(t, xkey) for t in miss], [value(t, ykey) for t in miss], s=18,
                   marker="x", color="0.6", alpha=0.45, label="trial over budget")
        best = sorted((t for t in done if t["number"] in front), key=lambda t: value(t, xkey))
        if best:
            if ykey != "drop" and len(objectives) == 2:  # a 2-D front is a staircase; with
                # three objectives this panel is a projection, and a staircase would mislead
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
        if ykey in ("drop", "accuracy"):
            ax.axhline(doc["max_drop"], color="tab:orange", ls="--", lw=1,
                       label=f"budget {doc['max_drop']:g} points")
        for axis, key in ((ax.xaxis, xkey), (ax.yaxis, ykey)):
            if key not in ("drop", "accuracy"):
                shown = [value(t, key) for t in done]
                if baseline is not None and ykey != "drop":
                    shown.append(value({"objectives": baseline}, key))
                _log_axis(ax, axis, shown)
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
