"""The flagship pipeline composed from Python, with a user's own stage in the middle.

    python examples/python_api.py [--out runs/python_api]

``fine_tune_head`` below is an ordinary function: the pipeline caches it, measures its output and
reports it like any built-in stage. Run the script twice and every stage comes from the cache.
"""

from __future__ import annotations

import argparse
import copy

import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress import Pipeline, data, models
from kdcompress.context import StageContext
from kdcompress.losses import CE, KD
from kdcompress.progress import RichProgress
from kdcompress.stages import decompose_tt, distill, export_onnx, quantize_onnx, train
from kdcompress.training import FitConfig, fit


def fine_tune_head(model: nn.Module, *, epochs: int = 2, lr: float = 1e-3,
                   ctx: StageContext) -> nn.Module:
    """A user stage: fine-tune only the classifier of a model with cross-entropy.

    Declaring ``ctx`` gives the stage the pipeline's data, device and seed; the function returns a
    new model and leaves its input alone. ``fit`` is the loop the built-in stages use: progress
    bar, validation accuracy per epoch, a clear error if the loss turns NaN, data-parallel under
    torchrun.
    """
    model = copy.deepcopy(model)
    model.features.requires_grad_(False)  # fit optimises only what requires a gradient

    def loss_fn(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(net(x), y)

    fit(model, loss_fn, ctx.data, config=FitConfig(epochs=epochs, lr=lr), ctx=ctx,
        description="fine-tune")
    return model.requires_grad_(True).cpu().eval()


def build(teacher_epochs: int = 10, student_epochs: int = 8) -> Pipeline:
    """The pipeline: teacher -> TT student -> KD -> user fine-tune -> ONNX -> int8."""
    pipeline = Pipeline("python_api", data=data.digits(), seed=0)
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=32),
                             epochs=teacher_epochs)
    student = pipeline.stage(decompose_tt, out="student", model=teacher, rank=6)
    student_kd = pipeline.stage(distill, out="student_kd", student=student, teacher=teacher,
                                loss=KD(temperature=4) * 0.9 + CE() * 0.1,
                                epochs=student_epochs)
    tuned = pipeline.stage(fine_tune_head, out="tuned", model=student_kd, epochs=2)
    fp32 = pipeline.stage(export_onnx, out="fp32", model=tuned)
    pipeline.stage(quantize_onnx, out="int8", model=fp32, mode="static")
    return pipeline


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/python_api")
    args = parser.parse_args()
    report = build().run(out=args.out, progress=RichProgress())
    final = report.row("int8")
    print(f"int8: accuracy {final.accuracy:.4f}, {final.smaller_by:.1f}x smaller than the "
          f"teacher, agreement with it {final.agreement:.4f}")
