"""Hinton, Vinyals & Dean 2015 on MNIST: the distillation result, the transfer set without 3s,
and the temperature sweep.

Run by hand (it is not a test)::

    python benchmarks/hinton_mnist.py --data DIR                    # everything, 3 seeds
    python benchmarks/hinton_mnist.py --data DIR --parts main transfer
    python benchmarks/hinton_mnist.py --data DIR --epochs 1 --seeds 0 1 --train-limit 2000  # check

Every model is trained through kdcompress's own stages (``train``, ``distill``) and kept in
``--cache`` (default ``runs/hinton_mnist``): a second run, or one killed and restarted, trains
only what is missing. The tables go to stdout and ``CACHE/hinton_mnist.md``, the sweep's plot to
``CACHE/temperature_sweep.png``, every number to ``CACHE/results.json``.

Parts
-----
main
    Teacher: MLP 784-1200-1200-10, ReLU, dropout 0.5 (0.2 on the input), inputs shifted by up to
    2 pixels (``RandomCrop(padding=2)``). Student: 784-800-800-10, no dropout, no weight decay,
    no augmentation, trained alone (cross-entropy) and distilled from the teacher of the same
    seed at T = 20 (``KD(temperature=20) * 0.9 + CE() * 0.1``, the KD term carrying the T^2
    factor). Test errors out of 10,000, per seed and their mean (and validation errors of 5,000, per
    seed, for choosing settings); the share of the
    student-teacher gap that distillation closes (paper: 67 / 146 / 74 errors, 91%).
transfer
    The student distilled (seed 0 teacher) on a transfer set without any 3; errors on the 10,000
    test images and on their 1,010 threes, then again after adding to the class-3 logit the
    bias that minimises the *validation* errors (paper: 206 errors, 133 on threes; 109 and 14).
sweep
    The distilled student at T in {1, 2, 4, 8, 16, 20}, 3 seeds each: mean and standard
    deviation of test errors, a table and a plot.
consistent
    The transfer set jittered like the teacher's training set, the teacher and the student
    seeing the same shifted batch ("consistent teaching", Beyer et al., "Knowledge distillation:
    A good teacher is patient and consistent", CVPR 2022), T = 20, and the control that
    separates the jitter from the soft targets: the student trained alone with the same jitter.
    The share of the gap is given both against the plain student alone (the table's) and
    against the jittered student alone (what the soft targets add on top of the jitter).

Shortened to fit 2 CPU cores: the paper trains far longer (its teacher was also trained on all
60,000 images with stronger jitter); here every model trains ``--epochs`` epochs (default 30;
``--student-epochs`` gives the students their own) with AdamW and cosine decay on the 55,000
training images (the last 5,000 are validation).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import torch
from common import (  # benchmarks/common.py (scripts import it by name)
    reproduction_arguments,
    reproduction_setup,
)

from kdcompress import data, models
from kdcompress.augment import RandomCrop
from kdcompress.context import StageContext
from kdcompress.losses import CE, KD
from kdcompress.stages.distill import distill
from kdcompress.stages.train import train
from kdcompress.training import predict_logits

PAPER = {"teacher": 67, "student": 146, "distilled": 74, "no3": 206, "no3_threes": 133,
         "no3_shifted": 109, "no3_shifted_threes": 14}
TEMPERATURES = (1, 2, 4, 8, 16, 20)


def errors(model, x: torch.Tensor, y: torch.Tensor, bias3: float = 0.0) -> tuple[int, int]:
    """(test errors, errors on the 3s) with ``bias3`` added to the class-3 logit."""
    logits = predict_logits(model, x)
    logits[:, 3] += bias3
    wrong = logits.argmax(1) != y
    return int(wrong.sum()), int(wrong[y == 3].sum())


def best_bias3(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """The class-3 bias (grid 0..20, step 0.25) with the fewest errors on (x, y): validation."""
    logits = predict_logits(model, x)
    best = (len(y) + 1, 0.0)
    for step in range(81):
        shifted = logits.clone()
        shifted[:, 3] += step * 0.25
        best = min(best, (int((shifted.argmax(1) != y).sum()), step * 0.25))
    return best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reproduction_arguments(parser, cache="runs/hinton_mnist", epochs=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["main", "transfer", "sweep"],
                        choices=["main", "transfer", "sweep", "consistent"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES),
                        help="the sweep's temperatures (two processes may share a cache, each "
                             "with some of them; a last run with all of them writes the table)")
    parser.add_argument("--student-epochs", type=int, default=None,
                        help="epochs of the 784-800-800 students (default: --epochs); the "
                             "teachers keep --epochs and are shared with runs without it")
    parser.add_argument("--student-optimizer", choices=["adamw", "sgd"], default="adamw",
                        help="the students' optimiser (sgd: momentum 0.9, Nesterov, under which "
                             "the T^2 factor keeps the soft targets' step size, as in the "
                             "paper); the teachers keep AdamW")
    parser.add_argument("--student-lr", type=float, default=None,
                        help="the students' learning rate (default: --lr)")
    args = parser.parse_args()
    student_epochs = args.student_epochs or args.epochs
    student_lr = args.student_lr or args.lr
    # the students' cache keys name their epochs, optimiser and rate where they differ from the
    # teachers'
    se = "" if student_epochs == args.epochs else f"-e{student_epochs}"
    if args.student_optimizer != "adamw":
        se += f"-{args.student_optimizer}"
    if student_lr != args.lr:
        se += f"-lr{student_lr:g}"
    task, cache = reproduction_setup(parser, args, f"lr{args.lr:g}")
    x_test, y_test = task.arrays("test")
    started = time.perf_counter()
    lines = [f"## Hinton et al. 2015 on MNIST ({len(task.split('train'))} training images, "
             f"teachers {args.epochs} epochs, students {student_epochs} "
             f"({args.student_optimizer}, lr {student_lr:g}), seeds {args.seeds})", ""]

    def teacher(seed: int):
        return cache.model(f"teacher-s{seed}", lambda: train(
            models.mlp(hidden=(1200, 1200), dropout=0.5, input_dropout=0.2, seed=seed),
            epochs=args.epochs, lr=args.lr, transforms=[RandomCrop(padding=2)],
            ctx=StageContext.standalone("teacher", task, seed=seed)))

    def alone(seed: int, jitter: bool = False):
        return cache.model(f"student{'-jitter' if jitter else ''}{se}-s{seed}", lambda: train(
            models.mlp(hidden=(800, 800), seed=seed), epochs=student_epochs, lr=student_lr,
            optimizer=args.student_optimizer, weight_decay=0.0,
            transforms=[RandomCrop(padding=2)] if jitter else None,
            ctx=StageContext.standalone("student", task, seed=seed)))

    def distilled(seed: int, temperature: float, on: data.Task = task, tag: str = "",
                  jitter: bool = False):
        # jitter: the teacher and the student see the same shifted batch (consistent teaching)
        return cache.model(f"distilled{tag}{se}-T{temperature:g}-s{seed}", lambda: distill(
            models.mlp(hidden=(800, 800), seed=seed), teacher(seed),
            loss=KD(temperature=temperature) * 0.9 + CE() * 0.1, epochs=student_epochs,
            lr=student_lr, optimizer=args.student_optimizer, weight_decay=0.0,
            transforms=[RandomCrop(padding=2)] if jitter else None,
            ctx=StageContext.standalone("student_kd", on, seed=seed)))

    measured = cache.results.setdefault("errors", {})

    def error_key(name: str, seed: int) -> str:
        """Where ``measured`` keeps a main-table model's errors (students name their epochs)."""
        return f"{name}{'' if name == 'teacher' else se}-s{seed}"

    x_val, y_val = task.arrays("val")
    splits = {"test": ("errors", x_test, y_test), "val": ("val_errors", x_val, y_val)}

    def count(key: str, build, split: str = "test") -> int:
        """Errors on the 10,000 test images, or on the 5,000 validation images (``"val"``: what a
        choice of settings may look at)."""
        table, x, y = splits[split]
        return cache.number(table, key, lambda: errors(build(), x, y)[0])

    if "main" in args.parts:
        rows: dict[str, list[int]] = {}
        val_rows: dict[str, list[int]] = {}
        for name, fn in (("teacher", teacher), ("student", alone),
                         ("distilled", lambda s: distilled(s, 20))):
            for s in args.seeds:
                build = functools.cache(lambda s=s, f=fn: f(s))  # loaded once for both splits
                rows.setdefault(name, []).append(count(error_key(name, s), build))
                val_rows.setdefault(name, []).append(count(error_key(name, s), build, "val"))
        mean = {k: statistics.mean(v) for k, v in rows.items()}
        # the share is defined only when the teacher beats the student alone
        gap = (mean["student"] - mean["distilled"]) / (mean["student"] - mean["teacher"]) \
            if mean["student"] > mean["teacher"] else None
        cache.results["gap_closed"] = gap
        lines += ["| model | paper errors | kdcompress errors (mean) | per seed "
                  "| validation errors of 5,000, per seed |", "|---|---:|---:|---|---|"]
        for name, label in (("teacher", "teacher 784-1200-1200-10, dropout, jitter"),
                            ("student", "student 784-800-800-10 alone"),
                            ("distilled", "student distilled, T = 20")):
            lines.append(f"| {label} | {PAPER[name]} | {mean[name]:.1f} | "
                         f"{', '.join(map(str, rows[name]))} | "
                         f"{', '.join(map(str, val_rows[name]))} |")
        if gap is None:
            lines += ["", f"No gap to close: the teacher ({mean['teacher']:.1f} errors) does not "
                      f"beat the student alone ({mean['student']:.1f}); the teacher needs more "
                      "epochs (dropout and jitter train slowly) before the share means anything.",
                      ""]
        else:
            lines += ["", f"Distillation closes **{100 * gap:.0f}%** of the student-teacher gap "
                      f"(paper: 91%; bar: at least 80%).", ""]

    if "consistent" in args.parts:
        runs = {name: [count(error_key(name, s), lambda s=s, f=fn: f(s)) for s in args.seeds]
                for name, fn in (("teacher", teacher), ("student", alone),
                                 ("student-jitter", lambda s: alone(s, jitter=True)),
                                 ("distilled-jitter", lambda s: distilled(s, 20, tag="-jitter",
                                                                          jitter=True)))}
        mean = {k: statistics.mean(v) for k, v in runs.items()}

        def share(alone_errors: float) -> str:
            if alone_errors <= mean["teacher"]:
                return "no gap"
            closed = alone_errors - mean["distilled-jitter"]
            return f"{100 * closed / (alone_errors - mean['teacher']):.0f}%"

        cache.results["consistent"] = {"mean": mean, "gap_closed_vs_plain": share(mean["student"]),
                                       "gap_closed_vs_jittered": share(mean["student-jitter"])}
        cache.save()
        lines += ["Consistent teaching: the transfer set jittered as the teacher's training set "
                  "(the teacher and the student see the same shifted batch), T = 20:", "",
                  "| model | kdcompress errors (mean) | per seed |", "|---|---:|---|"]
        for name, label in (("teacher", "teacher (as above)"),
                            ("student", "student alone, no jitter (as above)"),
                            ("student-jitter", "student alone, jittered"),
                            ("distilled-jitter",
                             "student distilled, T = 20, jittered transfer set")):
            lines.append(f"| {label} | {mean[name]:.1f} | {', '.join(map(str, runs[name]))} |")
        lines += ["", f"Share of the student-teacher gap closed: against the plain student alone "
                  f"{share(mean['student'])}; against the jittered student alone "
                  f"{share(mean['student-jitter'])} (what the soft targets add beyond the "
                  "jitter).", ""]

    if "transfer" in args.parts:
        keep = task.arrays("train")[1] != 3
        x_train, y_train = task.arrays("train")
        no3 = data.from_tensors(x_train[keep], y_train[keep], x_test, y_test, x_val=x_val,
                                y_val=y_val, num_classes=10, name="mnist-no3")
        model = distilled(0, 20, on=no3, tag="-no3")
        bias = best_bias3(model, x_val, y_val)
        plain, plain3 = errors(model, x_test, y_test)
        shifted, shifted3 = errors(model, x_test, y_test, bias)
        cache.results["transfer"] = {"errors": plain, "threes": plain3, "bias3": bias,
                                     "shifted_errors": shifted, "shifted_threes": shifted3,
                                     "removed": int((~keep).sum())}
        cache.save()
        lines += [f"Transfer set without the {int((~keep).sum())} training 3s (seed 0, T = 20; "
                  f"1,010 test 3s):", "",
                  "| | paper errors | paper on 3s | kdcompress errors | kdcompress on 3s |",
                  "|---|---:|---:|---:|---:|",
                  f"| distilled without 3s | {PAPER['no3']} | {PAPER['no3_threes']} | {plain} | "
                  f"{plain3} |",
                  f"| class-3 bias + {bias:g} (chosen on validation) | {PAPER['no3_shifted']} | "
                  f"{PAPER['no3_shifted_threes']} | {shifted} | {shifted3} |", ""]

    if "sweep" in args.parts:
        sweep = {t: [count(f"distilled{se}-T{t:g}-s{s}", lambda s=s, t=t: distilled(s, t))
                     for s in args.seeds] for t in args.temperatures}
        lines += ["Temperature sweep (test errors of the distilled 784-800-800-10 student):", "",
                  "| T | mean | std | per seed |", "|---:|---:|---:|---|"]
        for t, v in sweep.items():
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            lines.append(f"| {t:g} | {statistics.mean(v):.1f} | {std:.1f} | "
                         f"{', '.join(map(str, v))} |")
        plot = cache.root / f"temperature_sweep{se}.png"
        reference = {name: [measured.get(error_key(name, s)) for s in args.seeds]
                     for name in ("student", "teacher")}
        _plot(sweep, reference, plot)
        lines += ["", f"Plot: `{plot}`", ""]

    lines.append(f"This run: {(time.perf_counter() - started) / 60:.1f} min; training time of "
                 f"every model: {sum(cache.results.get('seconds', {}).values()) / 60:.1f} min "
                 f"(load average {os.getloadavg()[0]:.1f} at the end).")
    text = "\n".join(lines) + "\n"
    (cache.root / f"hinton_mnist{se}.md").write_text(text)
    print(text)


def _plot(sweep: dict, reference: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ts = list(sweep)
    means = [statistics.mean(v) for v in sweep.values()]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in sweep.values()]
    ax.errorbar(ts, means, yerr=stds, marker="o", capsize=3, label="distilled student")
    for name, style in (("student", "--"), ("teacher", ":")):
        values = reference[name]
        if all(v is not None for v in values):
            ax.axhline(statistics.mean(values), linestyle=style, color="grey",
                       label=f"{name} alone" if name == "student" else "teacher")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ts, [f"{t:g}" for t in ts])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test errors (of 10,000)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
