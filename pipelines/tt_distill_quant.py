"""The flagship pipeline: teacher CNN -> tensor-train student -> distillation -> pruning -> int8.

    kdcompress run pipelines/tt_distill_quant.py                 # 8x8 digits, bundled
    kdcompress run pipelines/tt_distill_quant.py --data mnist:DIR  # the four MNIST IDX files
"""

from kdcompress import Pipeline, data, models
from kdcompress.losses import CE, KD
from kdcompress.stages import decompose_tt, distill, export_onnx, prune, quantize_onnx, train

pipeline = Pipeline("tt_distill_quant", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=64), epochs=20)
student = pipeline.stage(decompose_tt, out="student", model=teacher, rank=8)
student_kd = pipeline.stage(distill, out="student_kd", student=student, teacher=teacher,
                            loss=KD(temperature=4) * 0.9 + CE() * 0.1, epochs=15)
pruned = pipeline.stage(prune, out="pruned", model=student_kd, ratio=0.3, round_to=8,
                        teacher=teacher, recovery_epochs=5)
fp32 = pipeline.stage(export_onnx, out="fp32", model=pruned)
int8 = pipeline.stage(quantize_onnx, out="int8", model=fp32, mode="static")
