"""Teacher, then a student distilled with logits and a feature loss that needs an adapter."""

from kdcompress import Pipeline, data, models
from kdcompress.losses import CE, KD, FitNet
from kdcompress.stages import distill, train

pipeline = Pipeline("tiny_distill", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=16, hidden=16), epochs=3)
student = pipeline.stage(
    distill, out="student", student=models.cnn(width=8, hidden=16), teacher=teacher, epochs=3,
    lr=5e-3, keep_best=True,
    loss=KD(temperature=4) * 0.9 + CE() * 0.1
    + FitNet(student="features.conv3", teacher="features.conv3") * 0.1)
