"""The exceptions kdcompress raises.

Every error names the thing at fault (a stage, a layer, a shape, a file) and what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "KDCompressError",
    "PipelineError",
    "StageError",
    "DataError",
    "ArtifactError",
    "LayerError",
    "LossError",
    "DivergedError",
    "StoreError",
    "RunFolderLocked",
    "CorruptStage",
    "InputError",
    "RunFailed",
    "UsageError",
    "did_you_mean",
]


class KDCompressError(Exception):
    """Base class of every error raised by kdcompress."""


class PipelineError(KDCompressError):
    """A pipeline is declared wrongly: caught before any stage runs."""


class StageError(KDCompressError):
    """A stage failed while it ran, or was given something it cannot use."""


class DataError(KDCompressError):
    """A data set cannot be found, read or used."""


class ArtifactError(KDCompressError):
    """A model artifact cannot be saved, loaded or measured."""


class LayerError(KDCompressError):
    """A layer cannot be decomposed, rebuilt or pruned as asked."""


class LossError(KDCompressError):
    """A distillation loss is misconfigured or given incompatible tensors."""


class DivergedError(StageError):
    """Training produced a non-finite loss; the stage stops and nothing of it is cached."""


class StoreError(KDCompressError):
    """The run folder cannot be used: it is locked by another run, unwritable or full."""


class RunFolderLocked(StoreError):
    """Another live run holds the run folder's lock (and this run was told not to wait)."""


class CorruptStage(StoreError):
    """A stage folder whose fingerprint matches but whose files cannot be trusted; the stage is
    recomputed with a warning that names the file."""


class InputError(KDCompressError, ValueError):
    """An input does not match what a deployed graph expects (shape, dtype, type)."""


class RunFailed(StageError):
    """A stage of a run failed; ``report`` holds the rows up to it and the failure."""

    def __init__(self, message: str, stage: str, report: object) -> None:
        super().__init__(message)
        self.stage = stage
        self.report = report


class UsageError(KDCompressError):
    """Bad command-line usage or pipeline file (exit code 2)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when none is close.

    Examples
    --------
    >>> did_you_mean("studnet", ["student", "teacher"])
    " Did you mean 'student'?"
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
