"""Write a :class:`~kdcompress.analysis.sensitivity.Sensitivity` to disk: JSON, a markdown table
per kind (layers x settings) and a heat map (one panel per kind, colour = accuracy drop)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdcompress.analysis.sensitivity import Cell, Sensitivity

__all__ = ["save", "markdown", "heatmap", "render_tables", "JSON_FILE", "MD_FILE", "PNG_FILE"]

JSON_FILE, MD_FILE, PNG_FILE = "sensitivity.json", "sensitivity.md", "sensitivity.png"
_TITLES = {"tt": "TT rank", "svd": "SVD rank", "prune": "prune ratio", "int8": "int8"}


def _settings(result: Sensitivity, kind: str) -> list[int | float | str]:
    values = {c.setting for c in result.cells if c.kind == kind}
    return sorted(values, key=lambda s: (isinstance(s, str), s))


def _grid(result: Sensitivity, kind: str) -> tuple[list[str], list, dict[tuple[str, object], Cell]]:
    cells = {(c.layer, c.setting): c for c in result.cells if c.kind == kind}
    return result.layers(kind), _settings(result, kind), cells


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def markdown(result: Sensitivity) -> str:
    """The tables: one per kind, a row per layer, a column per setting."""
    how = ("incremental, from the changed layer onwards" if result.incremental
           else "a full forward pass per cell")
    lines = ["# Sensitivity", "",
             f"Baseline validation {result.metric} {100 * result.baseline:.2f}% on "
             f"{result.samples} samples; {_count(result.params)} parameters, "
             f"{_count(result.macs)} MACs; "
             f"{len(result.cells)} cells in {result.seconds:.1f} s "
             f"({how}"
             + "".join(f"; {k} {v:.1f} s" for k, v in result.timings.items()) + ").",
             "", f"Each cell: {result.metric} drop in points (+ = worse) / whole-model parameters"
             " / relative weight error (tt, svd).", ""]
    for kind in result.kinds():
        layers, settings, cells = _grid(result, kind)
        lines += [f"## {_TITLES.get(kind, kind)}", "",
                  "| layer | " + " | ".join(str(s) for s in settings) + " |",
                  "|---|" + "---:|" * len(settings)]
        for layer in layers:
            row = []
            for s in settings:
                c = cells.get((layer, s))
                if c is None:
                    row.append("")
                    continue
                text = f"{c.drop:+.2f} / {_count(c.params)}"
                if c.rel_error is not None:
                    text += f" / {c.rel_error:.2f}"
                row.append(text)
            lines.append(f"| {layer} | " + " | ".join(row) + " |")
        lines.append("")
    for note in result.notes:
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def render_tables(result: Sensitivity) -> list:
    """One ``rich.table.Table`` per kind: accuracy drop in points, coloured by size."""
    from rich.table import Table

    tables = []
    for kind in result.kinds():
        layers, settings, cells = _grid(result, kind)
        table = Table(title=f"{_TITLES.get(kind, kind)} · accuracy drop (points)",
                      caption=f"baseline {100 * result.baseline:.2f}% on {result.samples} "
                              "samples")
        table.add_column("layer", no_wrap=True)
        for s in settings:
            table.add_column(str(s), justify="right")
        for layer in layers:
            row = [layer]
            for s in settings:
                c = cells.get((layer, s))
                if c is None:
                    row.append("")
                    continue
                style = "green" if c.drop <= 0.5 else "yellow" if c.drop <= 2 else "red"
                row.append(f"[{style}]{c.drop:+.2f}[/]")
            table.add_row(*row)
        tables.append(table)
    return tables


def heatmap(result: Sensitivity, path: Path) -> Path:
    """Draw layers x settings, colour = accuracy drop, one panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize

    kinds = result.kinds() or ["tt"]
    drops = [c.drop for c in result.cells] or [0.0]
    better = min(drops) < 0  # a cell above the baseline: drawn in the colour below the scale
    norm = Normalize(vmin=0.0, vmax=max(max(drops), 1.0))
    cmap = plt.get_cmap("YlOrRd").with_extremes(under="#66bb6a")
    width = sum(1.2 + 0.9 * len(_settings(result, k)) for k in kinds)
    height = 1.2 + 0.4 * max(len(result.layers(k)) for k in kinds)
    fig, axes = plt.subplots(1, len(kinds), squeeze=False, layout="constrained",
                             figsize=(max(5.0, 2.5 + width), max(2.5, height)))
    image = None
    for ax, kind in zip(axes[0], kinds, strict=True):
        layers, settings, cells = _grid(result, kind)
        grid = np.full((max(len(layers), 1), max(len(settings), 1)), math.nan)
        for i, layer in enumerate(layers):
            for j, s in enumerate(settings):
                if (layer, s) in cells:
                    grid[i, j] = cells[(layer, s)].drop
        image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
        for i in range(len(layers)):
            for j in range(len(settings)):
                if not math.isnan(grid[i, j]):
                    dark = grid[i, j] > 0.6 * norm.vmax
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(settings)), [str(s) for s in settings], fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set_xlabel(_TITLES.get(kind, kind))
        ax.set_title(kind)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="validation accuracy drop (points)",
                     extend="min" if better else "neither")
    fig.suptitle(f"baseline {100 * result.baseline:.2f}% on {result.samples} validation samples",
                 fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(result: Sensitivity, folder: Path, *, plot: bool = True) -> dict[str, Path]:
    """Write ``sensitivity.json``, ``sensitivity.md`` and (``plot``) ``sensitivity.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / JSON_FILE, "md": folder / MD_FILE}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    paths["md"].write_text(markdown(result))
    if plot:
        paths["png"] = heatmap(result, folder / PNG_FILE)
    return paths
