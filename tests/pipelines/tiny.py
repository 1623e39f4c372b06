"""Two stages on digits: a small CNN trained for one epoch, then fine-tuned for one more."""

from kdcompress import Pipeline, data, models
from kdcompress.stages import train

pipeline = Pipeline("tiny", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16), epochs=1)
student = pipeline.stage(train, out="student", model=teacher, epochs=1, lr=1e-3)
