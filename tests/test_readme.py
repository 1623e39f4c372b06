"""Every Python block of the README runs as written, so the documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: Blocks that train or run a pipeline take seconds each: they run with the slow tests.
_SLOW = re.compile(r"\.run\(|\btrain\(|\bdistill\(|\bprune\(|\bsearch\(")


def blocks() -> list:
    text = README.read_text()
    params = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        code = match.group(1)
        marks = [pytest.mark.slow] if _SLOW.search(code) else []
        params.append(pytest.param(code, id=f"README.md:{line}", marks=marks))
    return params


def test_the_readme_has_python_blocks():
    assert len(blocks()) >= 5


@pytest.mark.parametrize("code", blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write runs/ write them here
    exec(compile(code, str(README), "exec"), {"__name__": "readme_block"})
