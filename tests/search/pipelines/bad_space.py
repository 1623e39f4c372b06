"""A search parameter whose step does not divide its range: refused while the file loads."""

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.stages import decompose_tt, train

pipeline = Pipeline("bad_space", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16), epochs=1)
student = pipeline.stage(decompose_tt, out="student", model=teacher,
                         rank=ks.int(2, 9, step=2, default=2))
