"""The GPU check: every CUDA path and the GPU bars, in under 10 minutes on one GPU.

Run by hand on a machine with a GPU (it is not a test; CPU-only machines skip it)::

    python benchmarks/gpu_check.py --data DIR          # all 55,000 MNIST training images
    python benchmarks/gpu_check.py                     # 8x8 digits (bundled)
    python benchmarks/gpu_check.py --smoke --device cpu  # the script's own paths, on the CPU

It measures, side by side in one process:

1. training throughput of the ``train`` stage against a plain loop with the data already on the
   GPU, same model (``models.cnn(width=64)``), batch size, optimiser and precision
   (bar: at least 80%);
2. the flagship pipeline (teacher, TT student, distillation, pruning, ONNX, int8) end to end on
   the device, with every stage's CUDA latency (ONNX stages too when onnxruntime-gpu is
   installed; otherwise the report says why) (bar: under 60 s on full MNIST, the exported
   student no slower than the teacher at batch 64);
3. parity of the teacher's predictions on CUDA and on the CPU (argmax agreement, largest logit
   difference) on the test split.

Markdown goes to stdout and ``--out``/gpu_check.md; the run folder to ``--out``/flagship.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcompress import Pipeline, data, models
from kdcompress.context import StageContext
from kdcompress.losses import CE, KD
from kdcompress.options import RunOptions
from kdcompress.placement import auto_batch
from kdcompress.runner import run
from kdcompress.stages import decompose_tt, distill, export_onnx, prune, quantize_onnx, train
from kdcompress.training import FitConfig, make_optimizer, predict_logits


def flagship(task: data.Task, scale: float, batch_size: int | None = None,
             precision: str = "auto") -> Pipeline:
    """pipelines/tt_distill_quant.py on ``task``, epochs multiplied by ``scale`` (at least 1).

    ``batch_size``/``precision`` go to every training stage (None/"auto": the device's choice;
    64/"fp32" are the CPU run's settings).
    """
    def e(n: int) -> int:
        return max(1, round(n * scale))

    p = Pipeline("tt_distill_quant", data=task, seed=0)
    teacher = p.stage(train, out="teacher", model=models.cnn(width=64), epochs=e(20),
                      batch_size=batch_size, precision=precision)
    student = p.stage(decompose_tt, out="student", model=teacher, rank=8)
    student_kd = p.stage(distill, out="student_kd", student=student, teacher=teacher,
                         loss=KD(temperature=4) * 0.9 + CE() * 0.1, epochs=e(15),
                         batch_size=batch_size, precision=precision)
    pruned = p.stage(prune, out="pruned", model=student_kd, ratio=0.3, round_to=8,
                     teacher=teacher, recovery_epochs=e(5), recovery_batch_size=batch_size,
                     recovery_precision=precision)
    fp32 = p.stage(export_onnx, out="fp32", model=pruned, tt_export="auto")
    p.stage(quantize_onnx, out="int8", model=fp32, mode="static")
    return p


def plain_loop(task: data.Task, device: torch.device, batch: int, lr: float, epochs: int,
               precision: torch.dtype | None) -> float:
    """Samples per second of the simplest loop: data on the device, randperm, AdamW, cosine."""
    torch.manual_seed(0)
    x, y = (t.to(device) for t in task.arrays("train"))
    model = models.cnn(width=64).build(task.input_shape, task.num_classes).to(device)
    steps = epochs * (len(x) // batch)
    optimizer, scheduler = make_optimizer(list(model.parameters()),
                                          FitConfig(lr=lr, batch_size=batch), total_steps=steps)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            seen += len(idx)
    sync()
    return seen / (time.perf_counter() - start)


def stage_throughput(task: data.Task, device: torch.device, batch: int, lr: float,
                     epochs: int, precision: str = "auto") -> tuple[float, dict]:
    """Samples per second of the ``train`` stage (its per-epoch validation included)."""
    ctx = StageContext.standalone("teacher", task, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    train(models.cnn(width=64), epochs=epochs, batch_size=batch, lr=lr, precision=precision,
          ctx=ctx)
    sync()
    samples = epochs * (len(task.split("train")) // batch) * batch
    return samples / (time.perf_counter() - start), ctx.details


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(data.DATA_ENV),
                        help="folder with the four MNIST IDX files (default: bundled digits)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    parser.add_argument("--smoke", action="store_true",
                        help="one epoch per stage on digits: checks the script, not the GPU")
    parser.add_argument("--flagship-only", action="store_true",
                        help="skip the throughput loops and the form timings")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the flagship's training batch (default: the device's choice)")
    parser.add_argument("--precision", default="auto",
                        help="the flagship's training precision (auto, fp32, bf16, fp16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped: PyTorch sees no CUDA GPU on this machine (run it where "
              "torch.cuda.is_available() is True, or pass --smoke --device cpu to check the "
              "script itself)")
        return 0
    task = data.digits() if args.smoke or not args.data else data.mnist(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report_md = args.out / "gpu_check.md"
    report_md.write_text("")
    figures: dict = {}

    def emit(*lines: str) -> None:  # each section as soon as it is measured (a killed run keeps it)
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        with report_md.open("a") as f:
            f.write(text)
        (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=2))

    emit(f"# GPU check on {name}", "", f"torch {torch.__version__}, data {task.name} "
         f"({len(task.split('train'))} training images)", "")

    if not args.flagship_only:
        throughput(task, device, 1 if args.smoke else 2, figures, emit)

    # 2. the flagship end to end on the device
    start = time.perf_counter()
    report = run(flagship(task, 0.05 if args.smoke else 1.0, args.batch_size, args.precision),
                 RunOptions(out=args.out / "flagship", device=str(device), fresh=True,
                            plot=False))
    wall = time.perf_counter() - start
    figures["flagship_seconds"] = wall
    figures["flagship_settings"] = {"batch_size": args.batch_size, "precision": args.precision}
    figures["stage_seconds"] = {r.name: r.seconds for r in report.stages}
    figures["measure_seconds"] = {r.name: r.measure_seconds for r in report.stages}
    figures["accuracy"] = {r.name: {"val": r.val_accuracy, "test": r.accuracy}
                           for r in report.stages}
    lines = ["## Flagship end to end", "", f"{wall:.1f} s on {device} (bar < 60 s on full "
             f"MNIST): the stages {sum(r.seconds for r in report.stages):.1f} s, measuring them "
             f"{sum(r.measure_seconds for r in report.stages):.1f} s; training batch "
             f"{args.batch_size or 'chosen for the device'}, precision {args.precision}", "",
             "| stage | s | measure s | val | test | CPU b64 ms | CUDA b1 ms | CUDA b64 ms | "
             "note |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.stages:
        cuda = r.latency_ms_cuda or {}
        note = r.timing.get("cuda", "")
        lines.append(f"| {r.name} | {r.seconds:.1f} | {r.measure_seconds:.1f} | "
                     f"{r.val_accuracy} | {r.accuracy} | "
                     f"{r.latency_ms['batch_64']['p50']} | "
                     f"{cuda.get('batch_1', {}).get('p50', '')} | "
                     f"{cuda.get('batch_64', {}).get('p50', '')} | {note} |")
    fp32 = report.row("fp32")
    lines += ["", f"export: tt_export {fp32.details.get('tt_export')!r}, timed on "
              f"{fp32.details.get('tt_export_timed_on')}, layers made dense: "
              f"{fp32.details.get('materialised_tt_layers')}", ""]
    for r in report.stages:
        if r.details.get("batch"):
            lines.append(f"- {r.name}: batch {r.details['batch']}, precision "
                         f"{r.details.get('precision')}, warm-up {r.details.get('lr_warmup')}")
    emit(*lines)
    stages = args.out / "flagship" / "stages"
    onnx_on_device(task, stages, device, figures, emit)
    if args.flagship_only:
        return 0
    forms_and_parity(task, stages, report, device, figures, emit)
    return 0


def onnx_on_device(task: data.Task, stages: Path, device: torch.device, figures: dict,
                   emit) -> None:
    """The exported graphs' test predictions in ONNX Runtime on CUDA against the CPU's."""
    if device.type != "cuda":
        return
    import numpy as np

    from kdcompress.artifacts import OnnxModel
    from kdcompress.metrics import onnx_bound_call, onnx_cuda_missing

    lines = ["## ONNX graphs on the GPU (ONNX Runtime's CUDA provider) against the CPU", ""]
    x, y = task.arrays("test")
    for name in ("fp32", "int8"):
        graph = OnnxModel(next((stages / name).glob("*.onnx")))
        missing = onnx_cuda_missing(graph)
        if missing:
            lines.append(f"- {name}: {missing}")
            continue
        session = graph.session("cuda")
        cpu, dev = [], []
        for i in range(0, len(x), 1000):
            chunk = x[i:i + 1000].numpy().astype(np.float32)
            cpu.append(graph.predict(chunk))
            dev.append(torch.from_numpy(
                onnx_bound_call(session, chunk, "cuda")().copy_outputs_to_cpu()[0]))
        cpu_l, dev_l = torch.cat(cpu), torch.cat(dev)
        agree = float((cpu_l.argmax(1) == dev_l.argmax(1)).float().mean())
        acc = float((dev_l.argmax(1) == y).float().mean())
        figures.setdefault("onnx_cuda", {})[name] = {
            "agreement": agree, "max_logit_diff": float((cpu_l - dev_l).abs().max()),
            "test_accuracy_cuda": acc, "providers": session.get_providers()}
        lines.append(f"- {name}: providers {session.get_providers()}; argmax agreement "
                     f"{agree:.4f}, largest logit difference "
                     f"{float((cpu_l - dev_l).abs().max()):.2e}, test accuracy on CUDA {acc:.4f}")
    emit(*lines, "")


def throughput(task: data.Task, device: torch.device, epochs: int, figures: dict, emit) -> None:
    """Section 1: ``train`` against the plain loop, side by side."""
    # throughput, side by side: the batch the train stage picks for this device, and 64
    choice = auto_batch(None, 2e-3, samples=len(task.split("train")), device=device,
                        optimizer="adamw")
    fp16 = torch.float16 if device.type == "cuda" else None
    plain_loop(task, device, choice.batch_size, choice.lr, 1, fp16)  # warm-ups (cuDNN, imports)
    stage_throughput(task, device, choice.batch_size, choice.lr, 1)
    rows = []
    settings = [(choice.batch_size, choice.lr, "auto", fp16), (64, 2e-3, "auto", fp16)]
    if device.type == "cuda":
        settings.append((choice.batch_size, choice.lr, "bf16", torch.bfloat16))
    for batch, lr, precision, dtype in settings:
        plain = plain_loop(task, device, batch, lr, epochs, dtype)
        staged, details = stage_throughput(task, device, batch, lr, epochs, precision)
        rows.append(f"| {batch} | {details.get('precision')} | {plain:,.0f} | {staged:,.0f} | "
                    f"{staged / plain:.2f} |")
        figures.setdefault("throughput", []).append(
            {"batch": batch, "precision": details.get("precision"), "plain": plain,
             "train": staged, "placement": details["data_placement"]["reason"]})
    emit("## Training throughput (models.cnn(width=64))", "",
         f"{epochs} epochs per loop; the batch the train stage picks here: {choice.batch_size} "
         f"({choice.rule}); data: {details['data_placement']['reason']}", "",
         "| batch | precision | plain loop, data on the device (samples/s) | `train` stage, "
         "validation included (samples/s) | ratio (bar >= 0.80) |", "|---:|---|---:|---:|---:|",
         *rows, "")


def forms_and_parity(task: data.Task, stages: Path, report, device: torch.device,
                     figures: dict, emit) -> None:
    """Sections 3 and 4: the student's forms against the teacher; CUDA/CPU teacher parity."""
    # 3. the exported student's form against the teacher, in PyTorch on the device
    from kdcompress.artifacts import load_module
    from kdcompress.layers import materialize
    from kdcompress.metrics import time_calls

    teacher_model = load_module(stages / "teacher").to(device).eval()
    pruned = load_module(stages / "pruned").eval()
    example = task.example(64).float()
    exported, chosen = materialize(pruned, mode="auto", example_input=example, device=device)
    forms = {"teacher": teacher_model, "student factorized": pruned,
             "student as exported (auto, timed here)": exported,
             "student all dense": materialize(pruned, mode="dense")[0]}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # each form is timed against the teacher in a pair of its own, in both orders (at these
    # launch-bound sub-millisecond times the slot in an interleaved rotation shifts the median);
    # the teacher against a copy of itself shows how large that shift is
    forms["teacher (a second copy: the control)"] = copy.deepcopy(teacher_model)
    lines = ["## The exported student's form against the teacher, PyTorch on the device", "",
             "Each row is timed interleaved with the teacher, in both orders; ratio = the mean of "
             "the two p50 ratios.", "",
             "| model | b1 ms | b64 ms | / teacher b1 | / teacher b64 |",
             "|---|---:|---:|---:|---:|"]
    timed: dict[str, dict] = {}
    with torch.inference_mode():
        models_on = {k: m.to(device).eval() for k, m in forms.items()}
        inputs = {b: task.example(b).float().to(device) for b in (1, 64)}
        for k, m in models_on.items():
            if k == "teacher":
                continue
            timed[k] = {}
            for b, xb in inputs.items():
                pair = [lambda m=m, xb=xb: m(xb), lambda xb=xb: models_on["teacher"](xb)]
                mine1, ref1 = time_calls(pair, sync=sync)
                ref2, mine2 = time_calls(pair[::-1], sync=sync)
                timed[k][f"batch_{b}"] = round((mine1["p50"] + mine2["p50"]) / 2, 4)
                timed[k][f"ratio_{b}"] = round((mine1["p50"] / ref1["p50"]
                                                + mine2["p50"] / ref2["p50"]) / 2, 3)
    for k, t in timed.items():
        lines.append(f"| {k} | {t['batch_1']} | {t['batch_64']} | {t['ratio_1']} | "
                     f"{t['ratio_64']} |")
    figures["forms_ms"] = timed
    ratio = timed["student as exported (auto, timed here)"]["ratio_64"]
    lines += ["", f"layers made dense when timed here: {chosen}; student as exported / teacher "
              f"at b64: {ratio:.2f} (bar <= 1.00)"]
    emit(*lines)

    # 4. CUDA against CPU predictions of the trained teacher
    teacher = report.row("teacher")
    x, _ = task.arrays("test")
    cpu = predict_logits(load_module(stages / "teacher"), x)  # a CPU copy, written just now
    dev = predict_logits(teacher_model, x, device=device)
    agree = float((cpu.argmax(1) == dev.argmax(1)).float().mean())
    figures["agreement"] = agree
    _, y = task.arrays("test")
    cpu_accuracy = float((cpu.argmax(1) == y).float().mean())
    emit("", "## Teacher on the device against the CPU (test split)", "",
         f"argmax agreement {agree:.4f}, largest logit difference "
         f"{float((cpu - dev).abs().max()):.2e}; teacher test accuracy {teacher.accuracy} as the "
         f"run scored it on {device}, {cpu_accuracy:.6f} on the CPU")


if __name__ == "__main__":
    sys.exit(main())
