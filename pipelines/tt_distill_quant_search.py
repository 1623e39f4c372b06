"""The flagship pipeline with its main knobs left to a search: TT rank, pruning ratio, TT export.

    kdcompress search pipelines/tt_distill_quant_search.py          # 20 trials on digits
    kdcompress run pipelines/tt_distill_quant_search.py             # the defaults, as a pipeline
    kdcompress search pipelines/tt_distill_quant_search.py --data mnist:DIR --train-limit 6000

The search minimises the int8 model's size and latency (batch 64) with its validation accuracy
at most 1 point below the teacher's (``--max-drop``); trials share the teacher and every other
stage they have in common through the run folder's cache.
"""

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.losses import CE, KD
from kdcompress.stages import decompose_tt, distill, export_onnx, prune, quantize_onnx, train

pipeline = Pipeline("tt_distill_quant_search", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=64), epochs=20)
student = pipeline.stage(decompose_tt, out="student", model=teacher,
                         rank=ks.int(2, 12, step=2, default=8))
student_kd = pipeline.stage(distill, out="student_kd", student=student, teacher=teacher,
                            loss=KD(temperature=4) * 0.9 + CE() * 0.1, epochs=15)
pruned = pipeline.stage(prune, out="pruned", model=student_kd,
                        ratio=ks.float(0.0, 0.8, step=0.1, default=0.3), round_to=8,
                        teacher=teacher, recovery_epochs=5)
fp32 = pipeline.stage(export_onnx, out="fp32", model=pruned,
                      tt_export=ks.choice(["factorized", "auto"], default="factorized"))
int8 = pipeline.stage(quantize_onnx, out="int8", model=fp32, mode="static")
