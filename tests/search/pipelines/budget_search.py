"""A search over per-layer budgets on digits: the TT budget and the pruning allocation are
search parameters like any other constant."""

from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.stages import decompose_tt, prune, train

pipeline = Pipeline("budget_search", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=32), epochs=3)
student = pipeline.stage(decompose_tt, out="student", model=teacher, layers=[nn.Linear],
                         budget=ks.float(0.5, 0.7, step=0.2, default=0.7))
pruned = pipeline.stage(prune, out="pruned", model=student, ratio=0.3, recovery_epochs=0,
                        allocation=ks.choice(["uniform", "sensitivity"], default="uniform"))
