"""A pipeline file that defines build() instead of a module-level pipeline."""

from kdcompress import Pipeline, models
from kdcompress.stages import train


def build() -> Pipeline:
    pipeline = Pipeline("built")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    pipeline.stage(train, out="tuned", model=teacher, epochs=1)
    pipeline.stage(train, out="other", model=teacher, epochs=2)
    return pipeline
