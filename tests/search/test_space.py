"""Search parameters: refused when they cannot work, checked against the stage's rules when
declared, named, and replaced by values that fingerprint like literals."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcompress import Pipeline, models
from kdcompress import search as ks
from kdcompress.cli import main
from kdcompress.errors import PipelineError
from kdcompress.options import RunOptions
from kdcompress.runner import Runner
from kdcompress.stages import decompose_tt, export_onnx, quantize_onnx, train

PIPELINES = Path(__file__).resolve().parent / "pipelines"


@pytest.mark.parametrize("make, match", [
    (lambda: ks.choice([]), "no values to choose from"),
    (lambda: ks.choice([4, 8, 4]), "lists 4 twice"),
    (lambda: ks.int(8, 2), "low must be below high, but got low=8, high=2"),
    (lambda: ks.int(2, 9, step=2), "step 2 does not divide the range 2..9 .* make high 8 or 10"),
    (lambda: ks.float(0.0, 1.0, step=0.3), "step 0.3 does not divide the range"),
    (lambda: ks.float(0.0, 1.0, log=True), "a log range needs low > 0"),
    (lambda: ks.float(1e-4, 1e-2, step=1e-3, log=True), "a log range cannot have a step"),
    (lambda: ks.int(1, 4, step=0), "step must be > 0"),
    (lambda: ks.int(1, 4.5), "high must be an integer"),
    (lambda: ks.int(2, 8, step=2, default=5), "the default 5 is not one of the values"),
    (lambda: ks.choice(["a", "b"], default="c"), "the default 'c' is not one of the values"),
])
def test_a_space_that_cannot_work_is_refused_where_it_is_written(make, match):
    with pytest.raises(PipelineError, match=match):
        make()


def test_sizes_candidates_and_grid_values():
    assert ks.int(2, 12, step=2).size == 6
    assert ks.int(2, 12, step=2).__kdc_candidates__() == [2, 4, 6, 8, 10, 12]
    assert ks.float(0.0, 0.6, step=0.15).size == 5
    assert ks.float(1e-4, 1e-2, log=True).size is None
    # a value picked on a float grid is rounded to the step's decimals: 0.1 + 0.2 is 0.3, the
    # literal a file would hold, so both fingerprint alike
    assert ks.float(0.0, 0.6, step=0.1).decode(0.1 + 0.2) == 0.3
    assert ks.float(0.0, 0.6, step=0.1).contains(0.30000000000000004)
    assert not ks.int(2, 12, step=2).contains(5)
    assert not ks.int(2, 12).contains(True)



def test_neighbours_are_one_grid_step_either_side_inside_the_range():
    """What screening tries first around a value: literals a file would hold (0.2, not
    0.30000000000000004 - 0.1), none outside the range, none without a grid."""
    assert ks.int(2, 12, step=2).neighbours(8) == [6, 10]
    assert ks.int(2, 12, step=2).neighbours(2) == [4]
    assert ks.int(2, 12, step=2).neighbours(12) == [10]
    assert ks.int(1, 4).neighbours(2) == [1, 3]
    assert ks.float(0.0, 0.8, step=0.1).neighbours(0.3) == [0.2, 0.4]
    assert ks.float(0.0, 0.8, step=0.1).neighbours(0.1 + 0.2) == [0.2, 0.4]
    assert ks.float(0.0, 0.8, step=0.1).neighbours(0.8) == [0.7]
    assert ks.float(0.0, 0.6, step=0.15).neighbours(0.15) == [0.0, 0.3]
    assert ks.float(1e-4, 1e-2, log=True).neighbours(1e-3) == []  # no grid, no step
    assert ks.float(0.0, 1.0).neighbours(0.5) == []
    assert ks.int(1, 64, log=True).neighbours(8) == []
    assert ks.choice([4, 8, 16]).neighbours(8) == []  # a choice screens all its values
    assert ks.int(2, 12, step=2).neighbours(5) == []  # not a value of the parameter


def test_screening_values_leave_out_the_base_and_repeats():
    """A range: its neighbours, then the ends not already listed; a choice: its other values."""
    assert ks.float(0.0, 0.8, step=0.1).screening(0.3) == [0.2, 0.4, 0.0, 0.8]
    assert ks.int(1, 4).screening(2) == [1, 3, 4]  # 1 is a neighbour and an end: once
    assert ks.int(2, 12, step=2).screening(2) == [4, 12]  # the base is an end: left out
    assert ks.float(1e-4, 1e-2, log=True).screening(1e-3) == [1e-4, 1e-2]  # no grid: the ends
    assert ks.choice(["factorized", "auto", "dense"]).screening("auto") == ["factorized",
                                                                             "dense"]

def test_every_candidate_is_checked_against_the_stage_rules_when_declared(digits_task):
    pipeline = Pipeline("checks", data=digits_task)
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError, match=r"stage 'student' \(decompose_tt\): rank=ks.int\(0, 4"
                                             r"\) can take 0, but rank must be an integer >= 1"):
        pipeline.stage(decompose_tt, out="student", model=teacher, rank=ks.int(0, 4))
    fp32 = pipeline.stage(export_onnx, out="fp32", model=teacher)
    with pytest.raises(PipelineError, match="can take 'dynamc', but mode must be one of .* "
                                            "Did you mean 'dynamic'"):
        pipeline.stage(quantize_onnx, out="int8", model=fp32,
                       mode=ks.choice(["static", "dynamc"]))
    with pytest.raises(PipelineError, match="cannot be fingerprinted"):
        pipeline.stage(decompose_tt, out="student", model=teacher, rank=4,
                       layers=ks.choice([object(), "classifier.fc1"]))


def test_parameters_are_named_by_stage_and_keyword(digits_task):
    pipeline = Pipeline("names", data=digits_task)
    shared = ks.int(1, 3, default=2)
    teacher = pipeline.stage(train, out="teacher", epochs=shared,
                             model=models.cnn(width=ks.choice([8, 16], default=8)))
    pipeline.stage(train, out="tuned", model=teacher, epochs=shared,
                   lr=ks.float(1e-3, 2e-3, step=1e-3, default=1e-3, name="lr"))
    # one object used twice is one parameter; a parameter inside a model recipe is found
    assert list(pipeline.params) == ["teacher.epochs", "teacher.model.width", "lr"]
    with pytest.raises(PipelineError, match="two search parameters are named 'lr'"):
        pipeline.stage(train, out="again", model=teacher, lr=ks.float(1e-3, 2e-3, name="lr"))


def _fingerprints(pipeline: Pipeline, tmp_path: Path) -> dict[str, str]:
    runner = Runner(pipeline, RunOptions(out=tmp_path / "unused"))
    for name in runner.order:
        runner.fingerprints[name] = runner.fingerprint(runner.pipeline.stages[name])
    return dict(runner.fingerprints)


def test_a_concrete_pipeline_fingerprints_like_one_written_with_literals(digits_task, tmp_path):
    def declare(rank, width, lr):
        pipeline = Pipeline("same", data=digits_task, seed=0)
        teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=width), epochs=1,
                                 lr=lr)
        pipeline.stage(decompose_tt, out="student", model=teacher, rank=rank)
        return pipeline

    lr = ks.float(1e-3, 3e-3, step=1e-3, default=2e-3)
    searched = declare(ks.int(2, 8, step=2, default=8), ks.choice([8, 16], default=16), lr)
    literal = declare(4, 8, 0.003)
    concrete = searched.concrete({"student.rank": 4, "teacher.model.width": 8,
                                  "teacher.lr": lr.decode(1e-3 + 2e-3)})
    assert concrete.values == {"student.rank": 4, "teacher.model.width": 8, "teacher.lr": 0.003}
    assert concrete.params == {} and searched.params  # the original keeps its parameters
    assert _fingerprints(concrete, tmp_path) == _fingerprints(literal, tmp_path)
    # defaults: what `kdcompress run` runs
    assert _fingerprints(searched, tmp_path) == _fingerprints(declare(8, 16, 0.002), tmp_path)
    assert _fingerprints(literal, tmp_path) != _fingerprints(declare(6, 8, 0.003), tmp_path)
    with pytest.raises(PipelineError, match="cannot take 5"):
        searched.concrete({"student.rank": 5})
    with pytest.raises(PipelineError, match="no search parameter 'student.rnak'.* Did you mean "
                                            "'student.rank'"):
        searched.concrete({"student.rnak": 4})


def test_a_keyword_restating_its_default_fingerprints_like_one_left_out(digits_task, tmp_path):
    # a search file's `tt_export=ks.choice([...], default="factorized")` must find the stages of
    # the hand-written pipeline that leaves tt_export out
    def declare(**export):
        pipeline = Pipeline("same", data=digits_task, seed=0)
        teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
        pipeline.stage(export_onnx, out="fp32", model=teacher, **export)
        return pipeline

    left_out = _fingerprints(declare(), tmp_path)
    assert _fingerprints(declare(tt_export="factorized"), tmp_path) == left_out
    assert _fingerprints(declare(tt_export="auto"), tmp_path)["fp32"] != left_out["fp32"]
    assert _fingerprints(declare(atol=1e-3), tmp_path) == left_out
    assert _fingerprints(declare(atol=1e-2), tmp_path)["fp32"] != left_out["fp32"]


def test_run_refuses_a_parameter_without_default_with_exit_code_2(capsys, tmp_path):
    code = main(["run", str(PIPELINES / "no_default.py"), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "student.rank" in err and "has no default" in err and "kdcompress search" in err
    assert not (tmp_path / "run" / "stages").exists()  # refused before anything ran
