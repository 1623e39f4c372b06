"""Accuracy of a CNN whose fully connected layers are tensorized (~20x fewer FC weights), then
distilled from the original.

Run by hand::

    python benchmarks/tt_accuracy.py                              # digits (embedded)
    python benchmarks/tt_accuracy.py --data mnist --root /work/shared/data/mnist --width 16 \\
        --teacher-epochs 2 --student-epochs 2

Steps: train the teacher (``models.cnn``, cross-entropy); decompose ``classifier.fc1`` and
``classifier.fc2`` with the TT rank that first reaches the FC compression target (TT-SVD from the
trained weights), and, for comparison, with truncated SVD at the same FC parameter count;
distill each student (loss ``T^2 KL(p_T || p_S)`` at T=4 plus cross-entropy) and report test
accuracy before and after distillation.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress import data as kdata
from kdcompress import models
from kdcompress.layers.tensorize import tensorize

FC = ["classifier.fc1", "classifier.fc2"]


def accuracy(model: nn.Module, task: kdata.Task) -> float:
    x, y = task.arrays("test")
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    return 100.0 * float((pred == y).float().mean())


def fit(model: nn.Module, task: kdata.Task, epochs: int, lr: float,
        teacher: nn.Module | None = None, temperature: float = 4.0) -> nn.Module:
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loader = task.loader("train", batch_size=64, shuffle=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            logits = model(x.float())
            loss = F.cross_entropy(logits, y.long())
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x.float())
                kd = F.kl_div(F.log_softmax(logits / temperature, 1),
                              F.softmax(t_logits / temperature, 1), reduction="batchmean")
                loss = temperature ** 2 * kd + loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {epoch + 1}/{epochs}: test {accuracy(model, task):.2f}", flush=True)
    return model.eval()


def fc_params(model: nn.Module) -> int:
    return sum(p.numel() for n in FC for p in model.get_submodule(n).parameters())


def tt_rank_for(teacher: nn.Module, target: float) -> int:
    best = 1
    for rank in range(1, 64):
        student, _ = tensorize(teacher, layers=FC, rank=rank)
        if fc_params(teacher) / fc_params(student) < target:
            break
        best = rank
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--root", default=None)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--target", type=float, default=20.0)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = kdata.digits() if args.data == "digits" else kdata.mnist(args.root)
    start = time.time()
    teacher = models.cnn(width=args.width, hidden=args.hidden).build(task.input_shape,
                                                                     task.num_classes)
    print(f"teacher: {args.teacher_epochs} epochs")
    teacher = fit(teacher, task, args.teacher_epochs, 3e-3)
    acc_t = accuracy(teacher, task)
    rank = tt_rank_for(teacher, args.target)
    rows = []
    tt_student, records = tensorize(teacher, layers=FC, rank=rank)
    budget = fc_params(tt_student)
    svd_rank = 1
    while True:  # the largest SVD rank with no more FC weights than the TT student
        candidate, _ = tensorize(teacher, layers=FC, rank=svd_rank + 1, method="svd")
        if fc_params(candidate) > budget:
            break
        svd_rank += 1
    svd_student, svd_records = tensorize(teacher, layers=FC, rank=svd_rank, method="svd")
    for label, student, recs in (("TT", tt_student, records), ("SVD", svd_student, svd_records)):
        before = accuracy(student, task)
        print(f"{label} student (ranks {[r['ranks'] for r in recs]}): distilling")
        torch.manual_seed(0)
        student = fit(student, task, args.student_epochs, 3e-3, teacher=teacher)
        rows.append((label, [r["ranks"] for r in recs], fc_params(teacher) / fc_params(student),
                     sum(p.numel() for p in teacher.parameters())
                     / sum(p.numel() for p in student.parameters()),
                     [round(r["rel_error"], 3) for r in recs], before, accuracy(student, task)))
    print(f"\ndata={args.data} width={args.width} hidden={args.hidden} teacher epochs="
          f"{args.teacher_epochs} student epochs={args.student_epochs} "
          f"({time.time() - start:.0f} s)\n")
    print("| model | ranks | FC x fewer | model x fewer | init rel. error | test acc. "
          "(decomposed) | test acc. (distilled) | vs teacher |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| teacher | - | 1 | 1 | - | {acc_t:.2f} | {acc_t:.2f} | 0 |")
    for label, ranks, fc_x, model_x, err, before, after in rows:
        print(f"| {label} | {ranks} | {fc_x:.1f} | {model_x:.1f} | {err} | {before:.2f} | "
              f"{after:.2f} | {after - acc_t:+.2f} |")


if __name__ == "__main__":
    main()
