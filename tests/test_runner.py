"""Running a pipeline: order, caching, invalidation, resume, and the copies stages receive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress.artifacts import load_module
from kdcompress.errors import PipelineError, RunFailed
from kdcompress.report import load_report

#: Stage names in the order their user functions were called (the scheduler's cache is
#: only trustworthy if a cached stage's function is never called).
CALLS: list[str] = []
#: Stages that raise while their name is in here (a simulated crash).
CRASH: set[str] = set()


def make(model: nn.Module, ctx=None) -> nn.Module:
    CALLS.append(ctx.name)
    return model


def scale(model: nn.Module, *, factor: float = 1.0, ctx=None) -> nn.Module:
    CALLS.append(ctx.name)
    if ctx.name in CRASH:
        raise RuntimeError(f"simulated crash in {ctx.name}")
    with torch.no_grad():
        model.classifier.fc2.weight.mul_(factor)
    return model


def vandal(model: nn.Module, ctx=None) -> nn.Module:
    CALLS.append(ctx.name)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def returns_number(model: nn.Module, ctx=None) -> int:
    CALLS.append(ctx.name)
    return 3


def check_data(model: nn.Module, data=None, ctx=None) -> nn.Module:
    CALLS.append(ctx.name)
    assert data is ctx.data
    assert ctx.workdir.is_dir() and ctx.workdir.name.startswith(".tmp-")
    ctx.record("classes", data.num_classes)
    ctx.warn("a warning for the report")
    return model


@pytest.fixture(autouse=True)
def _clean_log():
    CALLS.clear()
    CRASH.clear()
    yield
    CALLS.clear()
    CRASH.clear()


@pytest.fixture
def run(fast_measure, tmp_path):
    """Run a pipeline into tmp_path/run with fast measurement."""
    def go(pipeline: Pipeline, **kwargs):
        kwargs.setdefault("out", tmp_path / "run")
        kwargs.setdefault("plot", False)
        return pipeline.run(measure=fast_measure, **kwargs)

    return go


def chain(task: data.Task, *, factor: float = 2.0) -> Pipeline:
    """a -> b -> c."""
    pipeline = Pipeline("chain", data=task)
    a = pipeline.stage(make, out="a", model=models.cnn(width=8, hidden=16))
    b = pipeline.stage(scale, out="b", model=a, factor=factor)
    pipeline.stage(scale, out="c", model=b, factor=0.5)
    return pipeline


def names(report) -> list[str]:
    return [r.name for r in report.stages]


def cached(report) -> list[bool]:
    return [r.cached for r in report.stages]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_module(folder).state_dict()


def test_order_is_topological_with_declaration_ties_and_a_shared_prefix(tiny_task, run):
    pipeline = Pipeline("branches", data=tiny_task)
    pipeline.stage(scale, out="tail", model=pipeline.ref("alpha"))
    root = pipeline.stage(make, out="root", model=models.cnn(width=8, hidden=16))
    pipeline.stage(scale, out="zeta", model=root, factor=0.3)
    pipeline.stage(scale, out="alpha", model=root, factor=0.6)
    assert pipeline.order() == ["root", "zeta", "alpha", "tail"]
    report = run(pipeline)
    assert names(report) == ["root", "zeta", "alpha", "tail"]
    assert CALLS == ["root", "zeta", "alpha", "tail"]  # the branch point ran once
    assert report.edges and ["root", "zeta"] in report.edges


def test_second_run_is_all_cached_and_calls_nothing(tiny_task, run, tmp_path):
    first = run(chain(tiny_task))
    assert CALLS == ["a", "b", "c"] and cached(first) == [False] * 3
    CALLS.clear()
    second = run(chain(tiny_task))
    assert CALLS == []
    assert cached(second) == [True] * 3
    for a, b in zip(first.stages, second.stages, strict=True):
        assert (a.accuracy, a.params, a.size_bytes) == (b.accuracy, b.params, b.size_bytes)
    assert load_report(tmp_path / "run").stages[2].cached is True
    # each row says how long measuring it took, apart from the stage's own seconds, and the
    # markdown adds them up
    assert all(r.measure_seconds > 0 for r in second.stages)
    total = sum(r.measure_seconds for r in second.stages)
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"measuring the stages took {total:.1f} s in all" in md


def test_changed_constant_reruns_the_stage_and_everything_downstream(tiny_task, run, tmp_path):
    run(chain(tiny_task, factor=2.0))
    c_before = weights(tmp_path / "run" / "stages" / "c")
    CALLS.clear()
    report = run(chain(tiny_task, factor=3.0))
    assert CALLS == ["b", "c"]
    assert cached(report) == [True, False, False]
    c_after = weights(tmp_path / "run" / "stages" / "c")
    key = "classifier.fc2.weight"
    torch.testing.assert_close(c_after[key], c_before[key] * 1.5)


def test_changed_data_reruns_everything(tiny_task, run):
    run(chain(tiny_task))
    CALLS.clear()
    x, y = tiny_task.arrays("train")
    xt, yt = tiny_task.arrays("test")
    other = data.from_tensors(x + 1, y, xt, yt, name="tiny")
    report = run(chain(tiny_task), data=other)
    assert CALLS == ["a", "b", "c"] and cached(report) == [False] * 3


def test_fresh_ignores_the_cache(tiny_task, run):
    run(chain(tiny_task))
    CALLS.clear()
    report = run(chain(tiny_task), fresh=True)
    assert CALLS == ["a", "b", "c"] and cached(report) == [False] * 3


def test_until_runs_only_the_stage_and_its_ancestors(tiny_task, run, tmp_path):
    pipeline = chain(tiny_task)
    pipeline.stage(scale, out="side", model=pipeline.ref("a"))
    report = run(pipeline, until="b")
    assert names(report) == ["a", "b"] and CALLS == ["a", "b"]
    assert not (tmp_path / "run" / "stages" / "c").exists()
    assert not (tmp_path / "run" / "stages" / "side").exists()
    CALLS.clear()
    report = run(pipeline)
    assert CALLS == ["c", "side"] and cached(report) == [True, True, False, False]


def test_unknown_until_or_only_suggests(tiny_task, run, tmp_path):
    with pytest.raises(PipelineError, match=r"--until 'bb' is not a stage of 'chain'\. "
                                            r"Did you mean 'b'\?"):
        run(chain(tiny_task), until="bb")
    with pytest.raises(PipelineError, match=r"--only 'cc' is not a stage"):
        run(chain(tiny_task), only="cc")
    assert not (tmp_path / "run").exists()


def test_only_needs_cached_inputs_then_reruns_just_that_stage(tiny_task, run, tmp_path):
    with pytest.raises(PipelineError, match=r"--only c needs 'a', which is not in .* "
                                            r"--until a first"):
        run(chain(tiny_task), only="c")
    assert CALLS == []
    run(chain(tiny_task))
    CALLS.clear()
    report = run(chain(tiny_task), only="c")
    assert CALLS == ["c"]
    # the other rows stay, re-measured from the store; only c ran
    assert names(report) == ["a", "b", "c"] and cached(report) == [True, True, False]
    assert report.row("c").agreement is not None  # compared with the cached baseline
    assert names(load_report(tmp_path / "run")) == ["a", "b", "c"]


def test_resume_after_a_crash(tiny_task, run, tmp_path):
    CRASH.add("b")
    with pytest.raises(RunFailed, match=r"stage 'b' \(scale\) failed: RuntimeError: simulated "
                                        r"crash in b") as info:
        run(chain(tiny_task))
    assert info.value.stage == "b"
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["name"] for r in saved["stages"]] == ["a"]
    assert saved["failed"]["name"] == "b"
    assert "simulated crash" in saved["failed"]["error"]
    assert "FAILED: b" in (tmp_path / "run" / "report.md").read_text()
    stages = tmp_path / "run" / "stages"
    assert not (stages / "b").exists() and not (stages / "c").exists()

    CRASH.clear()
    CALLS.clear()
    report = run(chain(tiny_task))
    assert CALLS == ["b", "c"]
    assert cached(report) == [True, False, False]
    assert report.failed is None
    assert not list(stages.glob(".tmp-*"))


def test_incomplete_stage_folders_are_not_trusted(tiny_task, run, tmp_path):
    run(chain(tiny_task))
    stages = tmp_path / "run" / "stages"
    (stages / "b" / "meta.json").unlink()  # killed between writing weights and meta
    (stages / "c" / "meta.json").write_text("{ not json")
    leftover = stages / ".tmp-a-12345"
    shutil.copytree(stages / "a", leftover)
    shutil.rmtree(stages / "a")
    CALLS.clear()
    report = run(chain(tiny_task))
    assert CALLS == ["a", "b", "c"]
    assert cached(report) == [False, False, False]
    assert not leftover.exists()
    assert all((stages / n / "meta.json").is_file() for n in "abc")


def test_stage_returning_a_non_model_fails_naming_it(tiny_task, run, tmp_path):
    pipeline = chain(tiny_task)
    pipeline.stage(returns_number, out="bad", model=pipeline.ref("c"))
    with pytest.raises(RunFailed, match=r"stage 'bad' \(returns_number\) failed: StageError: "
                                        r"returned int; a stage must return"):
        run(pipeline)
    saved = load_report(tmp_path / "run")
    assert names(saved) == ["a", "b", "c"] and saved.failed["name"] == "bad"
    assert not (tmp_path / "run" / "stages" / "bad").exists()


def test_a_stage_mutating_its_input_does_not_corrupt_upstream(tiny_task, run, tmp_path):
    pipeline = Pipeline("mutate", data=tiny_task)
    a = pipeline.stage(make, out="a", model=models.cnn(width=8, hidden=16))
    pipeline.stage(vandal, out="v", model=a)
    pipeline.stage(make, out="after", model=a)
    report = run(pipeline)
    stages = tmp_path / "run" / "stages"
    original, untouched = weights(stages / "a"), weights(stages / "after")
    assert any(t.abs().sum() > 0 for t in original.values())
    for key, value in original.items():
        torch.testing.assert_close(untouched[key], value)
    assert all(t.abs().sum() == 0 for k, t in weights(stages / "v").items()
               if k.endswith("weight"))
    assert report.row("after").agreement == 1.0


def test_a_stage_mutating_a_module_constant_leaves_it_alone(tiny_task, run):
    module = models.cnn(width=8, hidden=16).build(tiny_task.input_shape, tiny_task.num_classes)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    pipeline = Pipeline("constant", data=tiny_task)
    pipeline.stage(vandal, out="v", model=module)
    run(pipeline)
    for key, value in before.items():
        torch.testing.assert_close(module.state_dict()[key], value)
    CALLS.clear()
    assert cached(run(pipeline)) == [True]
    assert CALLS == []


def test_model_specs_are_built_for_the_data(tiny_task, run, tmp_path):
    g = torch.Generator().manual_seed(1)
    y, yt = torch.arange(30) % 3, torch.arange(12) % 3
    task = data.from_tensors(torch.randn(30, 1, 12, 12, generator=g), y,
                             torch.randn(12, 1, 12, 12, generator=g), yt, name="twelve")
    pipeline = chain(tiny_task)
    report = run(pipeline, data=task, out=tmp_path / "twelve")
    model = load_module(tmp_path / "twelve" / "stages" / "c")
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 3)
    assert report.data == "twelve"
    assert report.row("a").macs > 0


def test_stage_gets_data_and_a_context_and_its_notes_reach_the_report(tiny_task, run):
    pipeline = Pipeline("ctx", data=tiny_task)
    pipeline.stage(check_data, out="x", model=models.mlp(hidden=(8,)))
    row = run(pipeline).row("x")
    assert row.details == {"classes": 4}
    assert row.warnings == ["a warning for the report"]


def test_same_pipeline_twice_in_one_folder_keeps_one_row_per_stage(tiny_task, run, tmp_path):
    run(chain(tiny_task), until="a")
    report = run(chain(tiny_task))
    assert names(report) == ["a", "b", "c"]
    assert names(load_report(tmp_path / "run")) == ["a", "b", "c"]


def test_each_row_scores_the_test_split_once_baseline_included(tiny_task, run, monkeypatch,
                                                                tmp_path):
    """The baseline's test predictions, kept for every later row's agreement, are the ones its
    own row scored: no second pass over the test split."""
    import kdcompress.metrics as metrics

    scored: list[str] = []
    real = metrics.predict_split

    def counting(model, task, split, **kwargs):
        scored.append(split)
        return real(model, task, split, **kwargs)

    monkeypatch.setattr(metrics, "predict_split", counting)
    pipeline = Pipeline("once", data=tiny_task)
    a = pipeline.stage(make, out="a", model=models.cnn(width=8, hidden=16))
    pipeline.stage(vandal, out="v", model=a)
    pipeline.stage(make, out="after", model=a)
    report = run(pipeline)
    assert scored.count("test") == 3
    assert report.row("after").agreement == 1.0
    # every logit of the zeroed copy is 0, so it predicts class 0 everywhere: it agrees with the
    # baseline exactly where the baseline predicts class 0
    x, _ = tiny_task.arrays("test")
    base = real_predict(load_module(tmp_path / "run" / "stages" / "a"), x)
    assert report.row("v").agreement == pytest.approx(float((base == 0).float().mean()), abs=1e-6)


def real_predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from kdcompress.metrics import predict

    return predict(model, x).argmax(1)
