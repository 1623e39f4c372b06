"""A search parameter without a default: `kdcompress search` explores it, `kdcompress run`
refuses it."""

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.stages import decompose_tt, train

pipeline = Pipeline("no_default", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16), epochs=1)
student = pipeline.stage(decompose_tt, out="student", model=teacher, rank=ks.int(1, 4))
