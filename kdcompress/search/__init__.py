"""Search over a pipeline's constants: validation-constrained, latency/size Pareto front.

>>> from kdcompress import search as ks
>>> rank = ks.int(2, 12, step=2, default=8)            # in a pipeline file: rank=ks.int(...)
>>> mode = ks.choice(["factorized", "auto"], default="factorized")
>>> ratio = ks.float(0.0, 0.6, step=0.15, default=0.3)

A pipeline whose stage constants are search parameters runs as usual with ``kdcompress run``
(each parameter takes its default) and is explored with ``kdcompress search FILE`` or
:meth:`kdcompress.Pipeline.search`: every trial is a concrete pipeline run by the same runner into
one run folder, so stages shared between trials come from the cache.

Modules: ``space`` (the parameters), ``study`` (trials through optuna; ``trial`` runs alongside
each), ``store`` (the run folder with a version per stage fingerprint), ``front`` (the Pareto front
and its tables; ``plot`` draws it), ``bestfile`` (``best-<objective>.py``), ``live`` (the table
in the terminal).
"""

from __future__ import annotations

from typing import Any

from kdcompress.search.space import NO_DEFAULT, Param
from kdcompress.search.space import choice as choice
from kdcompress.search.space import float_range as float  # noqa: A001 - ks.float(...)
from kdcompress.search.space import int_range as int  # noqa: A001 - ks.int(...)

__all__ = ["choice", "float", "int", "Param", "NO_DEFAULT", "Search", "SearchConfig",
           "SearchResult", "OBJECTIVES"]

_LAZY = {"Search": "study", "SearchConfig": "study", "SearchResult": "front",
         "OBJECTIVES": "study"}


def __getattr__(name: str) -> Any:
    # the study imports optuna and the runner: a pipeline file importing ``ks`` needs neither
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"kdcompress.search.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kdcompress.search' has no attribute {name!r}")
