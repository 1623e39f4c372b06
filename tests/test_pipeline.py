"""Declaring a pipeline: every mistake is caught before anything runs, naming the stage at fault."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from kdcompress import OnnxModel, Pipeline, models
from kdcompress.errors import PipelineError
from kdcompress.stages import train


def shrink(model: nn.Module, *, ratio: float = 0.5) -> nn.Module:
    return model


def export(model: nn.Module) -> OnnxModel:
    raise AssertionError("never run")


def optimize(model: OnnxModel) -> OnnxModel:
    raise AssertionError("never run")


def combine(models: list[nn.Module]) -> nn.Module:
    return models[0]


def uses_data(model: nn.Module, data=None, ctx=None) -> nn.Module:
    return model


@pytest.fixture
def pipeline() -> Pipeline:
    return Pipeline("decl")


def test_handles_are_edges_and_the_rest_constants(pipeline):
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    student = pipeline.stage(shrink, out="student", model=teacher, ratio=0.3)
    both = pipeline.stage(combine, out="both", models=[teacher, student])
    stage = pipeline.stages["student"]
    assert stage.inputs == {"model": teacher}
    assert stage.constants == {"ratio": 0.3}
    assert pipeline.stages["both"].input_names == ["teacher", "student"]
    assert set(pipeline.graph().edges) == {("teacher", "student"), ("teacher", "both"),
                                           ("student", "both")}
    assert both.name == "both"


def test_unknown_keyword_names_the_stage_and_suggests(pipeline):
    with pytest.raises(PipelineError, match=r"stage 'teacher' \(train\).*epoch.*"
                                            r"Did you mean 'epochs'\?"):
        pipeline.stage(train, out="teacher", model=models.cnn(width=8), epoch=1)
    assert "teacher" not in pipeline.stages


def test_missing_required_keyword(pipeline):
    with pytest.raises(PipelineError, match=r"stage 'teacher' \(train\) needs model="):
        pipeline.stage(train, out="teacher", epochs=1)


def test_duplicate_out_name(pipeline):
    pipeline.stage(train, out="teacher", model=models.cnn(width=8))
    with pytest.raises(PipelineError, match="stage 'teacher' is declared twice"):
        pipeline.stage(train, out="teacher", model=models.cnn(width=16))


@pytest.mark.parametrize("key", ["data", "ctx"])
def test_injected_keywords_cannot_be_passed(pipeline, key):
    with pytest.raises(PipelineError, match=f"stage 'x' \\(uses_data\\): '{key}' is supplied by "
                                            "the pipeline"):
        pipeline.stage(uses_data, out="x", model=models.mlp(), **{key: None})


@pytest.mark.parametrize("name", ["has space", "", "1abc", "a/b", None])
def test_bad_pipeline_and_stage_names(name):
    with pytest.raises(PipelineError, match="must be a word"):
        Pipeline(name)
    with pytest.raises(PipelineError, match="must be a word"):
        Pipeline("ok").stage(shrink, out=name, model=models.mlp())


def test_data_must_be_a_task():
    with pytest.raises(PipelineError, match=r"takes a kdcompress.data.Task, but got Tensor"):
        Pipeline("p", data=torch.zeros(3))


def test_unknown_ref_suggests_the_closest_stage(pipeline):
    pipeline.stage(train, out="student_kd", model=models.mlp())
    pipeline.stage(shrink, out="pruned", model=pipeline.ref("student_kdd"))
    with pytest.raises(PipelineError, match=r"stage 'pruned' reads 'student_kdd', which no stage "
                                            r"produces\. Did you mean 'student_kd'\?"):
        pipeline.validate()


def test_ref_to_a_stage_declared_later_is_ordered_first(pipeline):
    pipeline.stage(shrink, out="late_reader", model=pipeline.ref("early"))
    pipeline.stage(train, out="early", model=models.mlp())
    assert pipeline.order() == ["early", "late_reader"]


def test_cycle_through_refs(pipeline):
    a = pipeline.stage(shrink, out="a", model=pipeline.ref("c"))
    b = pipeline.stage(shrink, out="b", model=a)
    pipeline.stage(shrink, out="c", model=b)
    with pytest.raises(PipelineError, match=r"pipeline 'decl' has a cycle: .*a.*b.*c"):
        pipeline.validate()
    with pytest.raises(PipelineError, match="cycle"):
        pipeline.order()


def test_torch_stage_fed_an_onnx_model(pipeline):
    teacher = pipeline.stage(train, out="teacher", model=models.mlp())
    fp32 = pipeline.stage(export, out="fp32", model=teacher)
    pipeline.stage(shrink, out="pruned", model=fp32)
    with pytest.raises(PipelineError, match=r"stage 'pruned' \(shrink\) takes a torch model as "
                                            r"model=, but 'fp32' is a onnx model \(from export\)"):
        pipeline.validate()


def test_onnx_stage_fed_a_torch_model(pipeline):
    teacher = pipeline.stage(train, out="teacher", model=models.mlp())
    pipeline.stage(optimize, out="fast", model=teacher)
    with pytest.raises(PipelineError, match=r"stage 'fast' \(optimize\) takes a onnx model as "
                                            r"model=, but 'teacher' is a torch model.*export_onnx"):
        pipeline.validate()


def test_onnx_into_onnx_is_fine(pipeline):
    teacher = pipeline.stage(train, out="teacher", model=models.mlp())
    fp32 = pipeline.stage(export, out="fp32", model=teacher)
    pipeline.stage(optimize, out="fast", model=fp32)
    assert pipeline.order() == ["teacher", "fp32", "fast"]


def test_unfingerprintable_constant_is_rejected_at_declaration(pipeline):
    with pytest.raises(PipelineError, match=r"stage 'x' \(shrink\), ratio= <object object at .*"
                                            r"cannot be fingerprinted"):
        pipeline.stage(shrink, out="x", model=models.mlp(), ratio=object())


def test_handle_from_another_pipeline(pipeline):
    other = Pipeline("other")
    foreign = other.stage(train, out="teacher", model=models.mlp())
    with pytest.raises(PipelineError, match=r"stage 'student' \(shrink\): model=<teacher> belongs "
                                            "to another pipeline"):
        pipeline.stage(shrink, out="student", model=foreign)


def test_handles_mixed_with_values(pipeline):
    teacher = pipeline.stage(train, out="teacher", model=models.mlp())
    with pytest.raises(PipelineError, match="models= mixes stage outputs with other values"):
        pipeline.stage(combine, out="both", models=[teacher, nn.Linear(2, 2)])


def test_unknown_baseline():
    pipeline = Pipeline("p", baseline="teacherr")
    pipeline.stage(train, out="teacher", model=models.mlp())
    with pytest.raises(PipelineError, match=r"baseline 'teacherr' is not a stage\. "
                                            r"Did you mean 'teacher'\?"):
        pipeline.validate()


def test_empty_pipeline(pipeline):
    with pytest.raises(PipelineError, match="pipeline 'decl' has no stages"):
        pipeline.validate()


def test_baseline_defaults_to_the_first_stage_in_order(pipeline):
    pipeline.stage(shrink, out="student", model=pipeline.ref("teacher"))
    pipeline.stage(train, out="teacher", model=models.mlp())
    assert pipeline.baseline_name() == "teacher"


def test_stage_names_stay_functions_after_their_modules_are_imported():
    code = ("import kdcompress.stages.train, kdcompress.stages.prune, kdcompress.stages.distill\n"
            "from kdcompress.stages import distill, prune, train\n"
            "import inspect\n"
            "assert all(inspect.isfunction(f) for f in (train, prune, distill)), (train, prune)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_rules_across_keywords_are_checked_at_declaration(pipeline):
    # settings each keyword allows alone but not together fail here, before the teacher trains
    from kdcompress import search as ks
    from kdcompress.stages import decompose_tt, prune

    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError, match=r"stage 'a' \(decompose_tt\): method='auto' picks TT "
                                            r"or SVD per layer .* give budget="):
        pipeline.stage(decompose_tt, out="a", model=teacher, method="auto")
    with pytest.raises(PipelineError, match=r"stage 'b' \(decompose_tt\): give budget or tol and "
                                            r"ratio, not both"):
        pipeline.stage(decompose_tt, out="b", model=teacher, budget=0.5, tol=0.1, ratio=4)
    with pytest.raises(PipelineError, match="but got method='tucker'"):
        pipeline.stage(decompose_tt, out="c", model=teacher, budget=0.5, method="tucker")
    with pytest.raises(PipelineError, match=r"stage 'd' \(prune\): allocation='sensitivity' sets "
                                            r"each group's ratio itself .* choose one"):
        pipeline.stage(prune, out="d", model=teacher, allocation="sensitivity",
                       global_pruning=True)
    # a search parameter is checked through its candidates, with the others' values
    with pytest.raises(PipelineError, match=r"method='auto' picks .* \(when method=.* takes "
                                            r"'auto'\); narrow the search parameter"):
        pipeline.stage(decompose_tt, out="e", model=teacher, method=ks.choice(["tt", "auto"]))
    with pytest.raises(PipelineError, match=r"takes 'sensitivity'.*global_pruning=.* takes True"):
        pipeline.stage(prune, out="f", model=teacher, allocation=ks.choice(["uniform",
                                                                            "sensitivity"]),
                       global_pruning=ks.choice([False, True]))
    assert not {"a", "b", "c", "d", "e", "f"} & set(pipeline.stages)
    # the allowed combinations declare
    pipeline.stage(decompose_tt, out="g", model=teacher, method=ks.choice(["tt", "auto"]),
                   budget=0.5)
    pipeline.stage(prune, out="h", model=teacher, allocation="sensitivity")
    pipeline.stage(decompose_tt, out="i", model=teacher, budget=0.5, method="svd")


def test_a_users_stage_declares_its_own_rule(pipeline):
    from kdcompress.declare import Choice, Rule, stage

    @stage(checks={"mode": Choice(["fast", "exact"])},
           rules=[Rule(("mode", "tolerance"),
                       lambda mode, tolerance: mode != "exact" or tolerance == 0.0,
                       "mode={mode} computes without error: drop tolerance={tolerance}")])
    def approximate(model: nn.Module, *, mode: str = "fast",
                    tolerance: float = 0.0) -> nn.Module:
        return model

    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    pipeline.stage(approximate, out="ok", model=teacher, tolerance=0.1)  # mode's default: fast
    with pytest.raises(PipelineError, match=r"stage 'bad' \(approximate\): mode='exact' computes "
                                            r"without error: drop tolerance=0.1"):
        pipeline.stage(approximate, out="bad", model=teacher, mode="exact", tolerance=0.1)
    with pytest.raises(PipelineError, match="approximate: mode='exact' computes"):
        from kdcompress.declare import check_arguments
        check_arguments(approximate, {"mode": "exact", "tolerance": 0.5})


def test_distill_settings_that_cannot_go_together_fail_at_declaration(pipeline):
    # before this stage's teacher trains: the teacher is a stage output, counted as given
    from kdcompress.losses import CE, KD, FitNet
    from kdcompress.stages import distill

    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError, match=r"stage 'a' \(distill\): self_distill='ema' distils "
                                            r"the student from itself; pass teacher=None"):
        pipeline.stage(distill, out="a", student=models.cnn(width=4), teacher=teacher,
                       self_distill="ema")
    with pytest.raises(PipelineError, match=r"stage 'b' \(distill\): the loss .*KD.* needs a "
                                            r"teacher: pass teacher="):
        pipeline.stage(distill, out="b", student=models.cnn(width=4))  # the default loss
    with pytest.raises(PipelineError, match=r"stage 'c' \(distill\): loss must be a "
                                            r"kdcompress.losses loss .*but got MSELoss"):
        pipeline.stage(distill, out="c", student=models.cnn(width=4), teacher=teacher,
                       loss=nn.MSELoss())
    with pytest.raises(PipelineError, match="needs a teacher"):
        pipeline.stage(distill, out="d", student=models.cnn(width=4), teacher=[],
                       loss=FitNet("conv1", "conv1"))
    assert not {"a", "b", "c", "d"} & set(pipeline.stages)
    # what goes together declares: a teacher (or several), or self-distillation without one
    pipeline.stage(distill, out="e", student=models.cnn(width=4), teacher=teacher)
    pipeline.stage(distill, out="f", student=models.cnn(width=4), teacher=[teacher, teacher],
                   loss=KD() + CE())
    pipeline.stage(distill, out="g", student=models.cnn(width=4), self_distill="born_again")


def test_a_rule_sees_a_stage_output_only_when_it_asks_to(pipeline):
    from kdcompress.declare import GIVEN, Rule, stage

    seen = []

    def no_reference_with_exact(mode, reference):
        seen.append(reference)
        return mode != "exact" or reference is None

    @stage(rules=[Rule(("mode", "reference"), no_reference_with_exact,
                       "mode={mode} needs no reference, but got reference={reference}",
                       sees_inputs=True)])
    def approximate(model: nn.Module, reference: nn.Module | None = None, *,
                    mode: str = "fast") -> nn.Module:
        return model

    @stage(rules=[Rule(("mode", "reference"), no_reference_with_exact, "never")])
    def approximate_later(model: nn.Module, reference: nn.Module | None = None, *,
                          mode: str = "fast") -> nn.Module:
        return model

    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError, match=r"stage 'bad' \(approximate\): mode='exact' needs no "
                                            r"reference, but got reference=<a stage's output>"):
        pipeline.stage(approximate, out="bad", model=teacher, reference=teacher, mode="exact")
    assert seen == [GIVEN]
    pipeline.stage(approximate, out="ok", model=teacher, mode="exact")  # reference: its default
    assert seen[-1] is None
    # without sees_inputs the rule is left to run time when it reads a stage output
    pipeline.stage(approximate_later, out="later", model=teacher, reference=teacher, mode="exact")
    assert len(seen) == 2
