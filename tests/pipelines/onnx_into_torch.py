from torch import nn

from kdcompress import OnnxModel, Pipeline, models
from kdcompress.stages import train


def to_onnx(model: nn.Module) -> OnnxModel:
    raise AssertionError("never runs: the pipeline is rejected first")


pipeline = Pipeline("onnx_into_torch")
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
fp32 = pipeline.stage(to_onnx, out="fp32", model=teacher)
tuned = pipeline.stage(train, out="tuned", model=fp32, epochs=1)
