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

A :class:`Rule` ties several keywords together (``method="auto"`` needs a ``budget``); it sees
the function's defaults for keywords left out, and with ``sees_inputs`` a keyword given as
another stage's output as :data:`GIVEN` (present, its value known only at run time).

The pipeline checks every constant against these declarations when a stage is declared, before
anything trains; the built-in stages call :func:`check_arguments` themselves too, so calling one
directly from Python gives the same error.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kdcompress.errors import PipelineError, did_you_mean

__all__ = ["stage", "StageSpec", "spec_of", "check_arguments", "Check", "Int", "Float", "Choice",
           "Rule", "GIVEN", "ROLES"]

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


class _Given:
    """The type of :data:`GIVEN`."""

    def __repr__(self) -> str:
        return "<a stage's output>"


#: What a :class:`Rule` with ``sees_inputs`` reads, at declaration, for a keyword given as another
#: stage's output: the keyword is given (it is not its default), its value is not known yet.
GIVEN = _Given()


@dataclass(frozen=True)
class Rule:
    """A rule across keywords, for settings each keyword's own check allows but not together.

    Parameters
    ----------
    keys : tuple of str
        The keywords it reads (the function's default stands in for one left out).
    ok : callable
        ``ok(**{key: value})``: whether the combination is allowed.
    message : str or callable
        The error: a format string over the keys (each given as its ``repr``), or a callable
        taking the values and returning the text.
    sees_inputs : bool
        Also check it when one of ``keys`` is given as another stage's output, which it then
        reads as :data:`GIVEN` (``teacher=<teacher>`` with ``self_distill`` is refused at
        declaration, whatever the teacher turns out to be). Without it, such a rule is left to
        run time.

    Examples
    --------
    >>> Rule(("budget", "method"), lambda budget, method: method != "auto" or budget is not None,
    ...      "method={method} needs a budget")({"budget": None, "method": "auto"})
    "method='auto' needs a budget"
    """

    keys: tuple[str, ...]
    ok: Callable[..., bool]
    message: str | Callable[..., str]
    sees_inputs: bool = False

    def __call__(self, values: Mapping[str, Any]) -> str | None:
        picked = {k: values[k] for k in self.keys}
        if self.ok(**picked):
            return None
        if callable(self.message):
            return self.message(**picked)
        return self.message.format(**{k: repr(v) for k, v in picked.items()})


#: Combinations of search-parameter candidates a rule is checked on at declaration, at most
#: (larger spaces are checked trial by trial, when each concrete pipeline is declared).
MAX_RULE_COMBINATIONS = 1024


@dataclass(frozen=True)
class StageSpec:
    """A stage function's declaration (see :func:`stage`)."""

    role: str = "transform"
    distributed: bool = False
    checks: Mapping[str, Check] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    @property
    def compresses(self) -> bool:
        """Whether the stage is expected to make its model smaller."""
        return self.role in COMPRESSING


_DEFAULT = StageSpec()


def stage(*, role: str = "transform", distributed: bool = False,
          checks: Mapping[str, Check] | None = None,
          rules: Sequence[Rule] = ()) -> Callable[[F], F]:
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
    rules : sequence of Rule
        Rules across keywords, checked then too (after each keyword's own check).

    Returns
    -------
    callable
        A decorator that records a :class:`StageSpec` on the function and returns it unchanged.
    """
    if role not in ROLES:
        raise PipelineError(f"stage role {role!r} is unknown.{did_you_mean(role, ROLES)} "
                            f"Use one of: {', '.join(ROLES)}")
    spec = StageSpec(role=role, distributed=distributed, checks=dict(checks or {}),
                     rules=tuple(rules))

    def decorate(fn: F) -> F:
        fn.__kdc_stage__ = spec  # type: ignore[attr-defined]
        return fn

    return decorate


def spec_of(fn: Callable[..., Any]) -> StageSpec:
    """The :class:`StageSpec` of a stage function (the default one for undecorated functions)."""
    return getattr(fn, "__kdc_stage__", _DEFAULT)


def check_arguments(fn: Callable[..., Any], values: Mapping[str, Any],
                    label: str | None = None, *, inputs: Iterable[str] = ()) -> None:
    """Check keyword ``values`` against ``fn``'s declared rules.

    ``inputs`` names keywords given as other stages' outputs: a :class:`Rule` reading one is
    left to run time unless it ``sees_inputs``, when it reads :data:`GIVEN` for them (a keyword
    missing from ``values`` otherwise stands for its default).

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
    later = set(inputs)
    given = {**values, **dict.fromkeys(later, GIVEN)}
    for rule in spec_of(fn).rules:
        if rule.sees_inputs:
            _check_rule(fn, rule, given, label)
        elif not later.intersection(rule.keys):
            _check_rule(fn, rule, values, label)


def _check_rule(fn: Callable[..., Any], rule: Rule, values: Mapping[str, Any],
                label: str) -> None:
    """Check ``rule`` on the given values (defaults for the others); a search parameter through
    every combination of its candidates with the other keywords'."""
    parameters = inspect.signature(fn).parameters
    choices: dict[str, list[Any]] = {}
    deferred: list[str] = []
    for key in rule.keys:
        if key in values:
            value = values[key]
        elif key in parameters and parameters[key].default is not inspect.Parameter.empty:
            value = parameters[key].default
        else:  # a stage input, or a keyword without a default: known only at run time
            return
        if _is_deferred(value):
            candidates = list(getattr(value, "__kdc_candidates__", lambda: [])())
            if not candidates:
                return
            choices[key] = candidates
            deferred.append(key)
        else:
            choices[key] = [value]
    if math.prod(len(c) for c in choices.values()) > MAX_RULE_COMBINATIONS:
        return
    for combination in itertools.product(*choices.values()):
        setting = dict(zip(choices, combination, strict=True))
        problem = rule(setting)
        if problem is None:
            continue
        if deferred:
            taken = ", ".join(f"{k}={values[k]!r} takes {setting[k]!r}" for k in deferred)
            raise PipelineError(f"{label}: {problem} (when {taken}); narrow the search "
                                "parameter")
        raise PipelineError(f"{label}: {problem}")


def _is_deferred(value: Any) -> bool:
    """Values decided later (a search parameter, a stage's output) are checked when known."""
    return getattr(value, "__kdc_deferred__", False)
