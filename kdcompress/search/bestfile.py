"""``best-<objective>.py``: the pipeline file with chosen values written in place of its search
parameters.

Each parameter recorded where its call stands in the file (:class:`~kdcompress.search.space.
Position`); the call's text is replaced by the source of the chosen value, and nothing else in
the file changes (comments, layout, other code), so the file's stages fingerprint like the trial
that chose them and ``kdcompress run`` loads them from the search's cache.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcompress.errors import KDCompressError
from kdcompress.fsutil import atomic_write_text
from kdcompress.search.space import Choice, Param

__all__ = ["best_file_text", "write_best_file"]


def best_file_text(params: Mapping[str, Param], values: Mapping[str, Any], *,
                   header: Sequence[str] = ()) -> tuple[Path, str]:
    """The source of the pipeline file the parameters were written in, with each parameter's
    call replaced by the source of its value.

    A value chosen from a list written in the call (``ks.choice([KD(4), DKD()])``) is replaced
    by that element's own source; any other value by its ``repr``, which must read back as the
    same literal. Everything else in the file (comments, layout, other code) is kept.

    Returns
    -------
    (Path, str)
        The original file and the new source (``header`` lines first, as comments).

    Raises
    ------
    KDCompressError
        The parameters were not all written in one file, a call cannot be found in it (the file
        changed since it was loaded), or a value has no source to write.
    """
    files = {Path(p.position.file).resolve() if p.position else None for p in params.values()}
    if len(files) != 1 or None in files:
        raise KDCompressError("the search parameters were not all written in one pipeline file "
                              f"({', '.join(sorted(str(f) for f in files))}), so no file can be "
                              "rewritten with the chosen values")
    path = files.pop()
    assert path is not None
    if not path.is_file():
        raise KDCompressError(f"the search parameters were written in {path}, which is not a "
                              "file (an interactive session?): no file can be rewritten")
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError) as exc:
        raise KDCompressError(f"the search parameters were written in {path}, which cannot be "
                              f"read back as Python ({type(exc).__name__}): no file can be "
                              "rewritten") from exc
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits: dict[tuple[int, int], tuple[int, str]] = {}
    for name, param in params.items():
        node = _find_call(calls, param, path)
        start = _index(lines, offsets, node.lineno, node.col_offset)
        end = _index(lines, offsets, node.end_lineno or node.lineno, node.end_col_offset or 0)
        text = _value_source(param, values[name], node, source, name)
        if (start, end) in edits and edits[(start, end)][1] != text:
            raise KDCompressError(f"{path}:{node.lineno}: one search parameter call stands for "
                                  f"several parameters with different values ({name}); write "
                                  "one call per parameter")
        edits[(start, end)] = (end, text)
    out = source
    for (start, end), (_, text) in sorted(edits.items(), reverse=True):
        out = out[:start] + text + out[end:]
    ast.parse(out)  # the replacement is valid Python
    return path, "".join(f"# {h}\n" for h in header) + out


def write_best_file(target: Path, params: Mapping[str, Param], values: Mapping[str, Any], *,
                    header: Sequence[str] = ()) -> Path:
    """Write :func:`best_file_text` to ``target`` atomically; return the original file."""
    path, text = best_file_text(params, values, header=header)
    atomic_write_text(target, text)
    return path


def _find_call(calls: list[ast.Call], param: Param, path: Path) -> ast.Call:
    pos = param.position
    assert pos is not None
    if pos.col is not None:
        found = [c for c in calls if (c.lineno, c.col_offset, c.end_lineno, c.end_col_offset)
                 == (pos.line, pos.col, pos.end_line, pos.end_col)]
    else:  # Python 3.10 records lines only: the one call of choice/int/float on that line
        found = [c for c in calls if c.lineno == pos.line and _callee(c) in ("choice", "int",
                                                                              "float")]
    if len(found) != 1:
        raise KDCompressError(f"{path}:{pos.line}: cannot find the call that created {param!r} "
                              "(the file changed since it was loaded, or several search "
                              "parameters share the line)")
    return found[0]


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _index(lines: list[str], offsets: list[int], lineno: int, col: int) -> int:
    """String index of an :mod:`ast` position (1-based line, column in UTF-8 bytes)."""
    line = lines[lineno - 1]
    return offsets[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8"))


def _value_source(param: Param, value: Any, call: ast.Call, source: str, name: str) -> str:
    if isinstance(param, Choice):
        listed = call.args[0] if call.args else next(
            (k.value for k in call.keywords if k.arg == "values"), None)
        if isinstance(listed, (ast.List, ast.Tuple)) and len(listed.elts) == len(param.values) \
                and not any(isinstance(e, ast.Starred) for e in listed.elts):
            segment = ast.get_source_segment(source, listed.elts[param.index(value)])
            if segment is not None:
                return segment
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value and type(ast.literal_eval(text)) is type(value)
    except (ValueError, SyntaxError):
        same = False
    if not same or (isinstance(value, float) and not math.isfinite(value)):
        raise KDCompressError(f"search parameter '{name}' chose {text}, which cannot be written "
                              "as a literal; list the values in the ks.choice([...]) call itself")
    return text
