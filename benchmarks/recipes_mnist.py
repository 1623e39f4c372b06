"""Each built-in recipe through the whole flagship pipeline on MNIST (issue 12's bar).

For ``resnet``, ``mobilenet`` and ``transformer``: train the teacher -> ``decompose_tt`` ->
``distill`` -> ``prune`` -> ``export_onnx`` -> ``quantize_onnx`` (static QDQ for the two CNNs,
dynamic for the transformer, whose MatMuls it quantizes at about 2/3 of static's size), run by
the normal runner with one run folder per recipe (``--out/<recipe>``): a second invocation loads
every finished stage from the cache, so an interrupted run resumes at the stage it was in. The
teacher is also exported to ONNX (``teacher_onnx``) to time it on the int8 model's engine.

The bar: the int8 model at most 1 point of test accuracy below its teacher, and at least 10x
smaller on disk (teacher weights file against the int8 ``.onnx``).

What is decomposed, and why (:data:`RECIPES`):

* resnet (depth 14, width 16): the 3x3 convolutions of the second and third stages, which hold
  ~90% of the weights; the stem, the first stage and the 1x1 shortcuts are small and read the
  earliest features. TT convs are group roots for ``prune``, so their channels are pruned too.
* mobilenet (width 16, expansion 4): the 1x1 expand/project convolutions of the blocks from the
  third stage on and the 1x1 head conv (~75% of the weights). Depthwise convolutions hold few
  weights and have no TT form here.
* transformer (dim 64, depth 4, 4 heads, MLP ratio 4 as in ViT): the MLP (``fc1``, ``fc2``)
  and the attention output projection ``proj`` of every block. ``q``/``k``/``v`` stay dense so
  that ``prune`` removes whole heads (the heads' columns of the TT ``proj`` go with them); a TT
  layer's outputs are never pruned, so TT q/k/v would leave nothing to prune.

Every int8 file is written with ``compact=True``: at these sizes most of a QDQ file is names,
zero points and per-channel metadata, not weights.

    python benchmarks/recipes_mnist.py --data /work/shared/data/mnist            # full size
    python benchmarks/recipes_mnist.py --data DIR --train-limit 500 --epochs 1 \\
        --distill-epochs 1 --recovery-epochs 1 --out /tmp/recipes_tiny           # a check
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcompress import Pipeline, data, models
from kdcompress.losses import CE, KD
from kdcompress.models import ModelSpec
from kdcompress.report import Report
from kdcompress.stages import decompose_tt, distill, export_onnx, prune, quantize_onnx, train

#: Default size of the training split: 10-30 minutes per recipe on 2 quiet cores (see README).
TRAIN_LIMIT = 10_000


@dataclass(frozen=True)
class Recipe:
    """One built-in model and how the pipeline compresses it."""

    model: ModelSpec
    layers: list[str]  # decompose_tt(layers=...)
    rank: int
    prune_ratio: float
    quantize: str  # "static" | "dynamic"


def _resnet_layers(depth: int) -> list[str]:
    n = (depth - 2) // 6
    return [f"stages.stage{s}.{b}.conv{c}" for s in (2, 3) for b in range(n) for c in (1, 2)]


def _mobilenet_layers() -> list[str]:
    # blocks 0 (stage 1, no expansion), 1-2 (stage 2), 3-5 (stage 3), 6-8 (stage 4)
    return [f"blocks.{b}.{part}.conv" for b in range(3, 9)
            for part in ("expand", "project")] + ["head.conv"]


def _transformer_layers(depth: int) -> list[str]:
    return [f"blocks.{i}.{name}" for i in range(depth)
            for name in ("attn.proj", "mlp.fc1", "mlp.fc2")]


RECIPES: dict[str, Recipe] = {
    "resnet": Recipe(models.resnet(depth=14, width=16), _resnet_layers(14), rank=16,
                     prune_ratio=0.3, quantize="static"),
    "mobilenet": Recipe(models.mobilenet(width=16, expansion=4), _mobilenet_layers(), rank=4,
                        prune_ratio=0.5, quantize="static"),
    "transformer": Recipe(models.transformer(dim=64, depth=4, heads=4, mlp_ratio=4.0),
                          _transformer_layers(4), rank=4, prune_ratio=0.7, quantize="dynamic"),
}


def build(name: str, task: data.Task, args: argparse.Namespace) -> Pipeline:
    """The flagship pipeline for recipe ``name`` on ``task``."""
    recipe = RECIPES[name]
    pipeline = Pipeline(f"recipes_mnist_{name}", data=task, seed=0)
    teacher = pipeline.stage(train, out="teacher", model=recipe.model, epochs=args.epochs)
    pipeline.stage(export_onnx, out="teacher_onnx", model=teacher)
    student = pipeline.stage(decompose_tt, out="student", model=teacher, rank=recipe.rank,
                             layers=recipe.layers)
    student_kd = pipeline.stage(distill, out="student_kd", student=student, teacher=teacher,
                                loss=KD(temperature=4) * 0.9 + CE() * 0.1,
                                epochs=args.distill_epochs)
    pruned = pipeline.stage(prune, out="pruned", model=student_kd, ratio=recipe.prune_ratio,
                            teacher=teacher, recovery_epochs=args.recovery_epochs)
    fp32 = pipeline.stage(export_onnx, out="fp32", model=pruned)
    pipeline.stage(quantize_onnx, out="int8", model=fp32, mode=recipe.quantize,
                   compact=True)
    return pipeline


def summary(name: str, report: Report, wall: float) -> dict[str, Any]:
    """The table's numbers for one recipe, from its report."""
    teacher, onnx, int8 = (report.row(n) for n in ("teacher", "teacher_onnx", "int8"))
    if teacher is None or int8 is None:
        raise RuntimeError(f"{name}: the report has no teacher or int8 row; see {report}")

    def p50(row: Any, batch: str) -> float | None:
        return None if row is None else row.latency_ms.get(batch, {}).get("p50")

    drop = 100 * (teacher.accuracy - int8.accuracy)
    ratio = teacher.size_bytes / int8.size_bytes
    return {
        "recipe": name, "teacher_accuracy": 100 * teacher.accuracy,
        "int8_accuracy": 100 * int8.accuracy, "drop": drop,
        "teacher_bytes": teacher.size_bytes, "int8_bytes": int8.size_bytes, "ratio": ratio,
        "latency_ms": {k: [p50(teacher, k), p50(onnx, k), p50(int8, k)]
                       for k in ("batch_1", "batch_64")},
        "stage_seconds": sum(r.seconds for r in report.stages),
        "wall_seconds": wall, "cached": all(r.cached for r in report.stages),
        "passes": drop <= 1.0 and ratio >= 10.0,
    }


def _ms(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the bar."""
    lines = ["| recipe | teacher acc | int8 acc | drop (pts) | teacher size | int8 size | smaller "
             "| b1 ms teacher / teacher ONNX / int8 | b64 ms teacher / teacher ONNX / int8 "
             "| stage time | bar |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['teacher_accuracy']:.2f} | {r['int8_accuracy']:.2f} "
            f"| {r['drop']:.2f} | {r['teacher_bytes'] / 1024:.1f} KiB "
            f"| {r['int8_bytes'] / 1024:.1f} KiB | {r['ratio']:.1f}x "
            f"| {_ms(r['latency_ms']['batch_1'])} | {_ms(r['latency_ms']['batch_64'])} "
            f"| {r['stage_seconds'] / 60:.1f} min | {'pass' if r['passes'] else 'FAIL'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get(data.DATA_ENV),
                        help="folder with the four MNIST IDX files (or set KDCOMPRESS_DATA)")
    parser.add_argument("--train-limit", type=int, default=TRAIN_LIMIT,
                        help=f"first N training images (default {TRAIN_LIMIT}); validation "
                             "(5,000) and test (10,000) are always whole")
    parser.add_argument("--epochs", type=int, default=8, help="teacher training epochs")
    parser.add_argument("--distill-epochs", type=int, default=16)
    parser.add_argument("--recovery-epochs", type=int, default=8,
                        help="distillation epochs after pruning")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES),
                        default=["resnet", "mobilenet", "transformer"])
    parser.add_argument("--out", type=Path, default=Path("runs/recipes_mnist"),
                        help="one run folder per recipe below it; a re-run reads the cache")
    parser.add_argument("--threads", type=int, default=1, help="threads when timing latency")
    args = parser.parse_args()
    if args.data is None:
        parser.error("give --data DIR (the four MNIST IDX files) or set KDCOMPRESS_DATA")
    for flag in ("train_limit", "epochs", "distill_epochs", "recovery_epochs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, but got "
                         f"{getattr(args, flag)}")
    task = data.mnist(args.data, train_limit=args.train_limit)
    rows = []
    for name in args.recipes:
        start = time.perf_counter()
        report = build(name, task, args).run(out=args.out / name, threads=args.threads,
                                             plot=False)
        rows.append(summary(name, report, time.perf_counter() - start))
        print(f"{name}: done in {rows[-1]['wall_seconds']:.0f} s "
              f"(stages {rows[-1]['stage_seconds']:.0f} s)", flush=True)
    text = table(rows)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    settings = (f"MNIST, first {args.train_limit} training images; teacher {args.epochs} epochs, "
                f"distillation {args.distill_epochs}, recovery {args.recovery_epochs}; latency "
                f"p50 at {args.threads} thread(s): teacher in PyTorch, teacher ONNX and int8 in "
                f"ONNX Runtime; load average {load}")
    print(f"\n{settings}\n\n{text}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipes.md").write_text(f"{settings}\n\n{text}\n")
    (args.out / "recipes.json").write_text(json.dumps(
        {"settings": vars(args) | {"out": str(args.out), "load": load}, "rows": rows},
        indent=1, default=str))


if __name__ == "__main__":
    main()
