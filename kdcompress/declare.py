"""What a stage function declares about itself, once: its role, whether it runs data-parallel,
and the meaning of its keywords.

>>> from kdcompress.declare import stage, Int, Float, Choice, spec_of
>>> @stage(role="transform", checks={"rank": Int(min=1), "method": Choice(["tt", "svd"])})
... def shrink(model, *, rank: int = 4, method: str = "tt"):
...     return model
>>> spec_of(shrink).role
'transform'
>>> check_arguments(shrink, {"rank": 0})
Traceback (most recent call last):
...
kdcompress.errors.PipelineError: shrink: rank must be >= 1, but got 0

The pipeline checks every constant against these declarations when a stage is declared, before
anything trains; the built-in stages call :func:`check_arguments` themselves too, so calling one
directly from Python gives the same error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kdcompress.errors import PipelineError, did_you_mean

__all__ = ["stage", "StageSpec", "spec_of", "check_arguments", "Check", "Int", "Float", "Choice",
           "ROLES"]

F = TypeVar("F", bound=Callable[..., Any])

#: What a stage does to its model. ``quantize`` and ``export`` produce ONNX graphs; ``train``
#: learns weights; the compressing roles (``decompose``, ``prune``, ``quantize``) are expected to
#: shrink the model; ``transform`` is anything else (the default for users' own stages).
ROLES = ("train", "distill", "decompose", "prune", "export", "quantize", "transform")
COMPRESSING = ("decompose", "prune", "quantize")


class Check:
    """A rule a keyword's value must satisfy; ``__call__`` returns an error text or ``None``."""

    def __call__(self, key: str, value: Any) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(Check):
    """An integer within ``[min, max]``; ``optional`` also admits ``None``."""

    min: int | None = None
    max: int | None = None
    optional: bool = False

    def __call__(self, key: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not _is_int(value):
            return f"{key} must be an integer, got {value!r}"
        if self.min is not None and value < self.min:
            return f"{key} must be >= {self.min}, but got {value}"
        if self.max is not None and value > self.max:
            return f"{key} must be <= {self.max}, but got {value}"
        return None


@dataclass(frozen=True)
class Float(Check):
    """A finite real number with optional bounds (``gt``/``ge`` below, ``lt``/``le`` above)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    optional: bool = False

    def __call__(self, key: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{key} must be a finite number, got {value!r}"
        for bound, ok, text in ((self.gt, lambda b: value > b, ">"),
                                (self.ge, lambda b: value >= b, ">="),
                                (self.lt, lambda b: value < b, "<"),
                                (self.le, lambda b: value <= b, "<=")):
            if bound is not None and not ok(bound):
                return f"{key} must be {text} {bound}, but got {value!r}"
        return None


@dataclass(frozen=True)
class Choice(Check):
    """One of a fixed set of values; strings get "did you mean"."""

    values: tuple[Any, ...] = field(default_factory=tuple)

    def __init__(self, values: Iterable[Any]) -> None:
        object.__setattr__(self, "values", tuple(values))

    def __call__(self, key: str, value: Any) -> str | None:
        if any(value == v and type(value) is type(v) for v in self.values):
            return None
        hint = did_you_mean(value, [v for v in self.values if isinstance(v, str)]) \
            if isinstance(value, str) else ""
        allowed = ", ".join(repr(v) for v in self.values)
        return f"{key} must be one of {allowed}, but got {value!r}.{hint}"


@dataclass(frozen=True)
class StageSpec:
    """A stage function's declaration (see :func:`stage`)."""

    role: str = "transform"
    distributed: bool = False
    checks: Mapping[str, Check] = field(default_factory=dict)

    @property
    def compresses(self) -> bool:
        """Whether the stage is expected to make its model smaller."""
        return self.role in COMPRESSING


_DEFAULT = StageSpec()


def stage(*, role: str = "transform", distributed: bool = False,
          checks: Mapping[str, Check] | None = None) -> Callable[[F], F]:
    """Declare what a stage function is, once.

    Parameters
    ----------
    role : str
        One of :data:`ROLES`; the report uses it (an int8 stage is compared with its fp32 parent).
    distributed : bool
        The function runs on every process under ``torchrun`` (it shards its data itself, as
        ``train`` and ``distill`` do); other stages run on rank 0 while the others wait.
    checks : dict of str to Check
        Rules for keyword values, checked when the stage is declared in a pipeline.

    Returns
    -------
    callable
        A decorator that records a :class:`StageSpec` on the function and returns it unchanged.
    """
    if role not in ROLES:
        raise PipelineError(f"stage role {role!r} is unknown.{did_you_mean(role, ROLES)} "
                            f"Use one of: {', '.join(ROLES)}")
    spec = StageSpec(role=role, distributed=distributed, checks=dict(checks or {}))

    def decorate(fn: F) -> F:
        fn.__kdc_stage__ = spec  # type: ignore[attr-defined]
        return fn

    return decorate


def spec_of(fn: Callable[..., Any]) -> StageSpec:
    """The :class:`StageSpec` of a stage function (the default one for undecorated functions)."""
    return getattr(fn, "__kdc_stage__", _DEFAULT)


def check_arguments(fn: Callable[..., Any], values: Mapping[str, Any],
                    label: str | None = None) -> None:
    """Check keyword ``values`` against ``fn``'s declared rules.

    A search parameter (``rank=ks.int(2, 12)``) is checked through its candidates: every value
    it can take, or the ends of a large or continuous range.

    Raises
    ------
    PipelineError
        Naming the stage, the keyword, the rule and the value (the first value that breaks a rule).
    """
    label = label or getattr(fn, "__name__", "stage")
    for key, check in spec_of(fn).checks.items():
        if key not in values:
            continue
        value = values[key]
        if not _is_deferred(value):
            problem = check(key, value)
            if problem:
                raise PipelineError(f"{label}: {problem}")
            continue
        for candidate in getattr(value, "__kdc_candidates__", lambda: [])():
            problem = check(key, candidate)
            if problem:
                raise PipelineError(f"{label}: {key}={value!r} can take {candidate!r}, but "
                                    f"{problem}; narrow the search parameter")


def _is_deferred(value: Any) -> bool:
    """Values decided later (a search parameter, a stage's output) are checked when known."""
    return getattr(value, "__kdc_deferred__", False)
