"""A tiny pipeline for `kdcompress sensitivity`: a teacher, its TT student and the ONNX export."""

from kdcompress import Pipeline, data, models
from kdcompress.stages import decompose_tt, export_onnx, train

pipeline = Pipeline("tiny_sensitivity", data=data.digits())
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=32), epochs=1)
student = pipeline.stage(decompose_tt, out="student", model=teacher, rank=4)
fp32 = pipeline.stage(export_onnx, out="fp32", model=student)
