from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress.stages import train


def explode(model: nn.Module, *, ratio: float) -> nn.Module:
    raise ValueError(f"ratio {ratio} is too large")


pipeline = Pipeline("failing", data=data.digits())
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16), epochs=1)
pipeline.stage(explode, out="exploded", model=teacher, ratio=2.0)
