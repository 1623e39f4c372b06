"""A tiny search-ready pipeline on digits: teacher -> TT student (rank searched) -> fine-tuned
student (epochs and learning rate searched)."""

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.stages import decompose_tt, train

pipeline = Pipeline("tiny_search", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16), epochs=3)
student = pipeline.stage(decompose_tt, out="student", model=teacher,
                         rank=ks.int(1, 4, default=2))
tuned = pipeline.stage(train, out="tuned", model=student, epochs=ks.choice([1, 2], default=1),
                       lr=ks.float(1e-3, 3e-3, step=1e-3, default=2e-3))
