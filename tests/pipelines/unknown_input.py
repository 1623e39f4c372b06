from kdcompress import Pipeline, models
from kdcompress.stages import train

pipeline = Pipeline("unknown_input")
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
student = pipeline.stage(train, out="student", model=pipeline.ref("teachr"), epochs=1)
