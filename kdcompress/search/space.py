"""Search parameters: a stage constant left open, with the values it may take.

>>> from kdcompress import search as ks
>>> rank = ks.int(2, 12, step=2, default=8)
>>> rank
ks.int(2, 12, step=2, default=8)
>>> rank.size
6
>>> ks.choice([], default=None)
Traceback (most recent call last):
...
kdcompress.errors.PipelineError: ks.choice([]) has no values to choose from: give at least two

A parameter stands for a stage keyword (``rank=ks.int(...)``) or for a value inside one
(``model=models.cnn(width=ks.choice([16, 32]))``). ``kdcompress run`` uses each parameter's
``default``; ``kdcompress search`` lets optuna pick values (:meth:`Param.suggest`). Every range is
checked when it is written, every candidate against the stage's rules when the stage is declared.
The call's position in its file is recorded, so a chosen value can be written back in its place
(:func:`kdcompress.search.front.write_best_file`).
"""

from __future__ import annotations

import builtins
import decimal
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kdcompress.errors import PipelineError

__all__ = ["Param", "Choice", "IntRange", "FloatRange", "Position", "choice", "int_range",
           "float_range", "param_paths", "find_params", "substitute", "values_text", "NO_DEFAULT"]


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


#: The ``default`` of a parameter given none: ``kdcompress run`` refuses it.
NO_DEFAULT: Any = _NoDefault()

#: Values optuna stores as they are; other choices are stored by their index.
_PLAIN = (type(None), bool, builtins.int, builtins.float, str)
#: Ranges with at most this many points have every point checked against the stage's rules.
_CHECK_ALL = 1024


@dataclass(frozen=True)
class Position:
    """Where a parameter was written: file, first and last line, first and last column (UTF-8
    bytes, as :mod:`ast` counts them); the columns are ``None`` before Python 3.11."""

    file: str
    line: builtins.int
    end_line: builtins.int
    col: builtins.int | None
    end_col: builtins.int | None


def _caller_position() -> Position | None:
    """The position of the call to ``choice``/``int_range``/``float_range`` that is creating a
    parameter: the frame above the one that called this function."""
    frame = sys._getframe(2)
    code = frame.f_code
    if hasattr(code, "co_positions"):  # Python >= 3.11: the exact span of the call expression
        line, end_line, col, end_col = list(code.co_positions())[frame.f_lasti // 2]
        if line is not None:
            return Position(code.co_filename, line, end_line or line, col, end_col)
    return Position(code.co_filename, frame.f_lineno, frame.f_lineno, None, None)


class Param:
    """A search parameter; build one with :func:`choice`, :func:`int_range` or
    :func:`float_range` (``ks.choice``, ``ks.int``, ``ks.float``).

    Attributes
    ----------
    default : Any
        The value ``kdcompress run`` uses; :data:`NO_DEFAULT` when not given.
    name : str, optional
        The parameter's name in the study; by default ``<stage>.<keyword>`` of its first use.
    position : Position, optional
        Where the call that created it stands in its file.
    """

    #: The declaration layer leaves deferred values unchecked until they are known.
    __kdc_deferred__ = True

    default: Any
    name: str | None
    position: Position | None

    @property
    def has_default(self) -> bool:
        """Whether ``kdcompress run`` can use this parameter as it is."""
        return self.default is not NO_DEFAULT

    @property
    def size(self) -> builtins.int | None:
        """How many values the parameter can take; ``None`` for a continuous range."""
        raise NotImplementedError

    def __kdc_candidates__(self) -> list[Any]:
        """Values the stage's rules are checked against: every value of a small space, the
        ends (and the default) of a large or continuous one."""
        raise NotImplementedError

    def suggest(self, trial: Any, name: str) -> Any:
        """The value optuna's ``trial`` picks for parameter ``name``."""
        raise NotImplementedError

    def decode(self, stored: Any) -> Any:
        """The value of a parameter as optuna stored it (the value itself, or its index)."""
        return stored

    def describe(self) -> dict[str, Any]:
        """A JSON description (the study records it, so a resumed search has the same space)."""
        raise NotImplementedError

    def _finish(self) -> None:
        if self.has_default and not self.contains(self.default):
            raise PipelineError(f"{self!r}: the default {self.default!r} is not one of the "
                                "values the parameter can take; pick one of them")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of the parameter's values."""
        raise NotImplementedError

    def neighbours(self, value: Any) -> list[Any]:
        """The values one grid step below and above ``value`` that the parameter can take
        (none for a choice, a continuous range or a log range: they have no step to take)."""
        return []

    def screening(self, value: Any) -> list[Any]:
        """The values a search screens in place of ``value``, in order, each once: every other
        value of a choice; for a range, :meth:`neighbours` first, then its two ends."""
        out: list[Any] = []
        for candidate in self._screened(value):
            if not _same(candidate, value) and not any(_same(candidate, v) for v in out):
                out.append(candidate)
        return out

    def _screened(self, value: Any) -> list[Any]:
        """:meth:`screening`'s candidates, before ``value`` and repeats are left out."""
        raise NotImplementedError


def _default_text(param: Param) -> str:
    parts = [] if param.name is None else [f"name={param.name!r}"]
    if param.has_default:
        parts.append(f"default={param.default!r}")
    return "".join(f", {p}" for p in parts)


class Choice(Param):
    """One of a list of values (numbers, strings, losses, model recipes...)."""

    def __init__(self, values: Iterable[Any], *, default: Any = NO_DEFAULT,
                 name: str | None = None, position: Position | None = None) -> None:
        self.values = tuple(values)
        self.default, self.name, self.position = default, name, position
        if not self.values:
            raise PipelineError("ks.choice([]) has no values to choose from: give at least two")
        for i, value in enumerate(self.values):
            if isinstance(value, Param):
                raise PipelineError(f"{self!r}: value {i} is itself a search parameter; list "
                                    "plain values")
            if any(_same(value, other) for other in self.values[:i]):
                raise PipelineError(f"{self!r} lists {value!r} twice; list each value once")
        self.plain = all(type(v) in _PLAIN for v in self.values)
        self._finish()

    def __repr__(self) -> str:
        return f"ks.choice({list(self.values)!r}{_default_text(self)})"

    @property
    def size(self) -> builtins.int:
        return len(self.values)

    def __kdc_candidates__(self) -> list[Any]:
        return list(self.values)

    def _screened(self, value: Any) -> list[Any]:
        return list(self.values)

    def contains(self, value: Any) -> bool:
        return any(_same(value, v) for v in self.values)

    def index(self, value: Any) -> builtins.int:
        """Position of ``value`` among the values."""
        return next(i for i, v in enumerate(self.values) if _same(value, v))

    def suggest(self, trial: Any, name: str) -> Any:
        if self.plain:
            return trial.suggest_categorical(name, list(self.values))
        return self.values[trial.suggest_categorical(name, list(range(len(self.values))))]

    def decode(self, stored: Any) -> Any:
        return stored if self.plain else self.values[stored]

    def describe(self) -> dict[str, Any]:
        from kdcompress.fingerprint import fingerprint_constant

        return {"kind": "choice", "values": [fingerprint_constant(v, repr(self))
                                             for v in self.values]}


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # values whose == is not a bool (tensors): identity only
        return a is b


def _is_int(value: Any) -> bool:
    return isinstance(value, builtins.int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (builtins.int, builtins.float)) and not isinstance(value, bool)


class IntRange(Param):
    """An integer in ``[low, high]`` on a grid of ``step``, or log-uniform with ``log=True``."""

    def __init__(self, low: builtins.int, high: builtins.int, *, step: builtins.int = 1,
                 log: bool = False, default: Any = NO_DEFAULT, name: str | None = None,
                 position: Position | None = None) -> None:
        self.low, self.high, self.step, self.log = low, high, step, log
        self.default, self.name, self.position = default, name, position
        for key, value in (("low", low), ("high", high), ("step", step)):
            if not _is_int(value):
                raise PipelineError(f"{self!r}: {key} must be an integer, but got {value!r}")
        _check_bounds(self, low, high, None if step == 1 else step, log)
        if (high - low) % step:
            below = low + (high - low) // step * step
            raise PipelineError(f"{self!r}: step {step} does not divide the range {low}..{high} "
                                f"(length {high - low}); make high {below} or {below + step}, "
                                "or change step")
        self._finish()

    def __repr__(self) -> str:
        extra = (f", step={self.step}" if self.step != 1 else "") + (", log=True" if self.log
                                                                     else "")
        return f"ks.int({self.low}, {self.high}{extra}{_default_text(self)})"

    @property
    def size(self) -> builtins.int:
        return (self.high - self.low) // self.step + 1

    def __kdc_candidates__(self) -> list[Any]:
        if self.size <= _CHECK_ALL:
            return list(range(self.low, self.high + 1, self.step))
        return [self.low, self.high] + ([self.default] if self.has_default else [])

    def contains(self, value: Any) -> bool:
        return (_is_int(value) and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def _screened(self, value: Any) -> list[Any]:
        return self.neighbours(value) + [self.low, self.high]

    def neighbours(self, value: Any) -> list[Any]:
        if self.log or not self.contains(value):
            return []
        return [v for v in (value - self.step, value + self.step) if self.contains(v)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "int", "low": self.low, "high": self.high, "step": self.step,
                "log": self.log}


class FloatRange(Param):
    """A real number in ``[low, high]``: uniform, on a grid of ``step``, or log-uniform."""

    def __init__(self, low: builtins.float, high: builtins.float, *,
                 step: builtins.float | None = None, log: bool = False, default: Any = NO_DEFAULT,
                 name: str | None = None, position: Position | None = None) -> None:
        self.low, self.high, self.step, self.log = low, high, step, log
        self.default, self.name, self.position = default, name, position
        for key, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None
                                                            else ()):
            if not _is_number(value) or not math.isfinite(value):
                raise PipelineError(f"{self!r}: {key} must be a finite number, but got {value!r}")
        _check_bounds(self, low, high, step, log)
        if step is not None:
            count = (high - low) / step
            if abs(count - round(count)) > 1e-9 * max(1.0, abs(count)):
                raise PipelineError(f"{self!r}: step {step} does not divide the range {low}..{high}"
                                    f" ({count:.4g} steps); choose a step that fits a whole "
                                    "number of times")
            self._digits = max(0, -decimal.Decimal(repr(builtins.float(step))).as_tuple().exponent)
            self._digits = max(self._digits, _decimals(low))
        self._finish()

    def __repr__(self) -> str:
        extra = (f", step={self.step}" if self.step is not None else "") + (
            ", log=True" if self.log else "")
        return f"ks.float({self.low}, {self.high}{extra}{_default_text(self)})"

    @property
    def size(self) -> builtins.int | None:
        return None if self.step is None else round((self.high - self.low) / self.step) + 1

    def __kdc_candidates__(self) -> list[Any]:
        return [self.low, self.high] + ([self.default] if self.has_default else [])

    def contains(self, value: Any) -> bool:
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        count = (value - self.low) / self.step
        return abs(count - round(count)) <= 1e-9 * max(1.0, abs(count))

    def suggest(self, trial: Any, name: str) -> Any:
        value = trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        return self.decode(value)

    def _screened(self, value: Any) -> list[Any]:
        return self.neighbours(value) + [self.low, self.high]

    def neighbours(self, value: Any) -> list[Any]:
        if self.step is None or not self.contains(value):
            return []
        k = round((value - self.low) / self.step)
        return [self.decode(self.low + i * self.step) for i in (k - 1, k + 1)
                if 0 <= i <= round((self.high - self.low) / self.step)]

    def decode(self, stored: Any) -> Any:
        # on a grid, low + k * step is rounded to the step's decimals: 0.30000000000000004 is
        # 0.3, so a value picked by the search fingerprints like the same literal in a file
        return stored if self.step is None else round(builtins.float(stored), self._digits)

    def describe(self) -> dict[str, Any]:
        return {"kind": "float", "low": self.low, "high": self.high, "step": self.step,
                "log": self.log}


def _decimals(value: builtins.float) -> builtins.int:
    return max(0, -decimal.Decimal(repr(builtins.float(value))).as_tuple().exponent)


def _check_bounds(param: Param, low: Any, high: Any, step: Any, log: bool) -> None:
    if low >= high:
        raise PipelineError(f"{param!r}: low must be below high, but got low={low!r}, "
                            f"high={high!r}; for a fixed value pass the value itself")
    if step is not None and step <= 0:
        raise PipelineError(f"{param!r}: step must be > 0, but got {step!r}")
    if log and low <= 0:
        raise PipelineError(f"{param!r}: a log range needs low > 0, but got {low!r}")
    if log and step is not None:
        raise PipelineError(f"{param!r}: a log range cannot have a step; drop step= or log=True")


def choice(values: Iterable[Any], *, default: Any = NO_DEFAULT,
           name: str | None = None) -> Choice:
    """A parameter taking one of ``values``.

    Parameters
    ----------
    values : iterable
        The values, each distinct: numbers, strings, ``None``, or any stage constant (a loss, a
        model recipe), which the study stores by index.
    default : Any, optional
        One of ``values``: what ``kdcompress run`` uses.
    name : str, optional
        Its name in the study (``<stage>.<keyword>`` by default); one parameter object used by
        several stages is one parameter.

    Examples
    --------
    >>> from kdcompress import search as ks
    >>> ks.choice(["factorized", "auto"], default="factorized").size
    2
    """
    return Choice(values, default=default, name=name, position=_caller_position())


def int_range(low: builtins.int, high: builtins.int, *, step: builtins.int = 1,
              log: bool = False, default: Any = NO_DEFAULT, name: str | None = None) -> IntRange:
    """An integer parameter in ``[low, high]`` (``ks.int``).

    Parameters
    ----------
    low, high : int
        The bounds, both included; ``low < high``.
    step : int
        Grid spacing; it must divide ``high - low``.
    log : bool
        Sample log-uniformly (``low > 0``, no step).
    default : int, optional
        A value of the range: what ``kdcompress run`` uses.
    name : str, optional
        Its name in the study.

    Examples
    --------
    >>> from kdcompress import search as ks
    >>> ks.int(2, 12, step=2, default=8).size
    6
    """
    return IntRange(low, high, step=step, log=log, default=default, name=name,
                    position=_caller_position())


def float_range(low: builtins.float, high: builtins.float, *, step: builtins.float | None = None,
                log: bool = False, default: Any = NO_DEFAULT,
                name: str | None = None) -> FloatRange:
    """A real parameter in ``[low, high]`` (``ks.float``).

    Parameters
    ----------
    low, high : float
        The bounds, both included; ``low < high``.
    step : float, optional
        Grid spacing; it must divide ``high - low``. Picked values are rounded to its decimals.
    log : bool
        Sample log-uniformly (``low > 0``, no step).
    default : float, optional
        A value of the range: what ``kdcompress run`` uses.
    name : str, optional
        Its name in the study.

    Examples
    --------
    >>> from kdcompress import search as ks
    >>> ks.float(0.0, 0.6, step=0.15, default=0.3).size
    5
    """
    return FloatRange(low, high, step=step, log=log, default=default, name=name,
                      position=_caller_position())


# -- parameters inside constants ------------------------------------------------------------

def param_paths(value: Any, path: str = "") -> list[tuple[str, Param]]:
    """The parameters in a constant with where they sit: the constant itself (``path``), or
    inside its lists, tuples, dicts and model recipes (``model=models.cnn(width=ks.choice(...))``
    gives ``"model.width"``), in order."""
    from kdcompress.models import ModelSpec

    if isinstance(value, Param):
        return [(path, value)]
    if isinstance(value, (list, tuple)):
        items: Iterable[tuple[str, Any]] = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        items = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, ModelSpec):
        items = ((f"{path}.{k}", v) for k, v in value.kwargs.items())
    else:
        return []
    return [found for key, child in items for found in param_paths(child, key)]


def find_params(value: Any) -> list[Param]:
    """The parameters in a constant (see :func:`param_paths`), each once."""
    found: list[Param] = []
    for _, param in param_paths(value):
        if not any(param is p for p in found):
            found.append(param)
    return found


def substitute(value: Any, pick: Callable[[Param], Any]) -> Any:
    """``value`` with every parameter ``p`` in it replaced by ``pick(p)``; the rest unchanged
    (the same objects where nothing inside them changes)."""
    from kdcompress.models import ModelSpec

    if isinstance(value, Param):
        return pick(value)
    if not find_params(value):
        return value
    if isinstance(value, (list, tuple)):
        items = [substitute(v, pick) for v in value]
        return items if isinstance(value, list) else type(value)(items)
    if isinstance(value, dict):
        return {k: substitute(v, pick) for k, v in value.items()}
    if isinstance(value, ModelSpec):
        return replace(value, kwargs={k: substitute(v, pick) for k, v in value.kwargs.items()})
    raise TypeError(f"cannot substitute parameters inside {type(value).__name__}")


def values_text(values: Mapping[str, Any]) -> str:
    """``"student.rank=4, pruned.ratio=0.3"``: parameter values for messages and tables."""
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."
