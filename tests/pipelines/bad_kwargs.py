from kdcompress import Pipeline, models
from kdcompress.stages import train

pipeline = Pipeline("bad_kwargs")
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
student = pipeline.stage(train, out="student", model=teacher, epoch=1)
