"""`kdcompress sensitivity`: the stage's model from the run folder, the files, errors before any
training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcompress.artifacts import load_module
from kdcompress.cli import main

PIPELINE = str(Path(__file__).parent / "pipelines" / "tiny_sensitivity.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The tiny pipeline run up to its TT student once, shared by the tests below."""
    out = tmp_path_factory.mktemp("run")
    assert main(["run", PIPELINE, "--out", str(out), "--until", "student"]) == 0
    return out


def _val_accuracy(model: torch.nn.Module, samples: int) -> float:
    from kdcompress import data

    x, y = data.digits().arrays("val")
    with torch.no_grad():
        return float((model.eval()(x[:samples]).argmax(1) == y[:samples]).float().mean())


def test_sensitivity_of_a_cached_stage(run_dir, capsys):
    meta = run_dir / "stages" / "teacher" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    report = (run_dir / "report.json").read_text()
    code = main(["sensitivity", PIPELINE, "--stage", "teacher", "--out", str(run_dir),
                 "--samples", "80", "--ranks", "2", "8", "--ratios", "0.25", "0.5",
                 "--layers", "classifier.fc1", "features.conv2"])
    assert code == 0
    assert meta.stat().st_mtime_ns == stamp  # the teacher came from the cache
    assert (run_dir / "report.json").read_text() == report  # the run's report is untouched
    folder = run_dir / "analysis" / "teacher"
    result = json.loads((folder / "sensitivity.json").read_text())
    teacher = load_module(run_dir / "stages" / "teacher")
    assert result["samples"] == 80
    assert result["baseline"] == pytest.approx(_val_accuracy(teacher, 80), abs=1e-6)
    cells = {(c["kind"], c["layer"], c["setting"]) for c in result["cells"]}
    assert cells == {("tt", "classifier.fc1", 2), ("tt", "classifier.fc1", 8),
                     ("tt", "features.conv2", 2), ("tt", "features.conv2", 8),
                     ("prune", "features.conv2", 0.25), ("prune", "features.conv2", 0.5),
                     ("prune", "classifier.fc1", 0.25), ("prune", "classifier.fc1", 0.5)}
    assert "| features.conv2 |" in (folder / "sensitivity.md").read_text()
    assert (folder / "sensitivity.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "TT rank" in out and "prune ratio" in out and "8 cells" in out


def test_sensitivity_prunes_a_tt_student(run_dir):
    code = main(["sensitivity", PIPELINE, "--stage", "student", "--out", str(run_dir),
                 "--samples", "50", "--kinds", "prune", "--ratios", "0.5", "--no-plot"])
    assert code == 0
    folder = run_dir / "analysis" / "student"
    result = json.loads((folder / "sensitivity.json").read_text())
    assert {c["layer"] for c in result["cells"]} == {"features.conv1", "features.conv2",
                                                     "features.conv3"}  # TT outputs protected
    assert not (folder / "sensitivity.png").exists()


@pytest.mark.slow  # exports and quantizes node by node: seconds
def test_int8_cells_of_an_onnx_stage(run_dir):
    code = main(["sensitivity", PIPELINE, "--stage", "fp32", "--out", str(run_dir),
                 "--samples", "50", "--kinds", "int8", "--no-plot"])
    assert code == 0
    result = json.loads((run_dir / "analysis" / "fp32" / "sensitivity.json").read_text())
    assert result["cells"] and {c["kind"] for c in result["cells"]} == {"int8"}


@pytest.mark.parametrize(("args", "match"), [
    (["--stage", "studnet"], "'studnet' is not a stage.*Did you mean 'student'"),
    (["--stage", "fp32"], "stage 'fp32' produces an ONNX graph.*teacher, student"),
    (["--stage", "teacher", "--ranks", "0"], "ranks must be integers >= 1"),
    (["--stage", "teacher", "--ratios", "1.5"], r"ratios must lie in \(0, 1\)"),
    (["--stage", "teacher", "--samples", "0"], "samples must be an integer >= 1"),
    (["--stage", "teacher", "--kinds", "tt", "lowrank"], "unknown kind 'lowrank'"),
])
def test_bad_usage_exits_2_before_training(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    assert main(["sensitivity", PIPELINE, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(match, " ".join(err.split())), err
    assert not out.exists()  # refused before any stage ran
