"""How one run is carried out: one frozen set of options, shared by the CLI and the Python API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcompress.data import Task
from kdcompress.metrics import MeasureConfig

__all__ = ["RunOptions", "default_run_dir"]


@dataclass(frozen=True)
class RunOptions:
    """Options of one run (``kdcompress run`` builds them from its flags).

    Attributes
    ----------
    out : path, optional
        Run folder; ``runs/<name>`` by default, ``runs/<name>-<data name>`` when ``data``
        replaces the pipeline's data.
    device : str
        ``"cpu"`` or ``"cuda"``: where training happens; latency is measured on the CPU, and on
        CUDA when used.
    fresh : bool
        Ignore cached stages and recompute everything.
    until : str, optional
        Stop after this stage (and what it needs).
    only : str, optional
        Re-run just this stage; its inputs must already be in the run folder.
    data : Task, optional
        Replaces the pipeline's data for this run.
    threads : int
        CPU threads used when measuring latency.
    measure : MeasureConfig, optional
        Measurement settings (repeats, batch sizes); built from ``threads`` when not given.
    wait : bool
        Wait for another run holding the run folder's lock (``False``: fail at once).
    plot : bool
        Draw ``report.png``.
    read_test : bool
        Score artifacts on the test split. ``False`` while a search chooses: rows then hold the
        validation accuracy only (``accuracy`` and ``agreement`` are ``None``), latency is timed
        on validation inputs, and the test split is never read.
    measure_only : tuple of str, optional
        Measure these stages (and the baseline) only; the others get no row. A search measures
        its baseline and the stage it optimises.
    by_fingerprint : bool
        Keep every version of a stage, one folder per fingerprint
        (``RUN/stages/<name>/<fingerprint>/``), and let several processes run into the folder at
        once. A search sets it; a folder once made this way keeps that layout for later runs.
    report_dir : path, optional
        Where ``report.json`` / ``report.md`` / ``report.png`` go; the run folder by default.
    """

    out: str | Path | None = None
    device: str = "cpu"
    fresh: bool = False
    until: str | None = None
    only: str | None = None
    data: Task | None = None
    threads: int = 1
    measure: MeasureConfig | None = None
    wait: bool = True
    plot: bool = True
    read_test: bool = True
    measure_only: tuple[str, ...] | None = None
    by_fingerprint: bool = False
    report_dir: str | Path | None = None

    def run_dir(self, pipeline: str) -> Path:
        """The run folder for a pipeline of this name."""
        if self.out is not None:
            return Path(self.out)
        return default_run_dir(pipeline, None if self.data is None else self.data.name)


def default_run_dir(pipeline: str, data: str | None = None) -> Path:
    """``runs/<pipeline>``, or ``runs/<pipeline>-<data>`` when the data was swapped for the run.

    Runs of one pipeline on other data keep their own artifacts instead of replacing these.
    """
    return Path("runs") / (pipeline if data is None else f"{pipeline}-{data}")
