"""Per-layer budgets against uniform settings, side by side on the MNIST flagship teacher.

Run by hand (the teacher is trained once and cached; every finished part is kept in
``--work`` and not run again, so an interrupted run resumes)::

    python benchmarks/budgets_mnist.py --data /work/shared/data/mnist \\
        --cache /work/runs_bench_cache --work /work/runs_bench_cache/budgets

1. TT at equal total parameters: ``decompose_tt(rank=r)`` (uniform) against
   ``decompose_tt(budget=<the uniform student's parameter count>)``, validation accuracy straight
   after decomposition and after the same distillation (``kdcompress.stages.distill``, default
   loss, ``--distill-epochs``), for each rank of ``--ranks`` and each layer set of ``--layers``
   (``linear``: the flagship's ``nn.Linear`` layers; ``all``: convolutions too);
   ``--budget-method auto`` lets the budget pick TT or SVD per layer; ``--distill-lr`` runs the
   distillation at other learning rates too; ``--keep-best`` distils with ``keep_best=True``.
   ``--teacher-module FOLDER`` takes a model saved by ``kdcompress.artifacts.save_module`` as
   the teacher instead (e.g. the 784-1200-1200-10 MLP that ``benchmarks/hinton_mnist.py`` keeps
   in ``CACHE/e30-lr0.001/models/teacher-s0``), with ``--train-limit 0`` for all 55,000
   training images.
2. Pruning at the same ratio: ``prune(allocation="uniform")`` against
   ``prune(allocation="sensitivity")`` with the same KD recovery (``--recovery-epochs``), for
   each seed of ``--seeds`` (the recovery's; the cut itself has no randomness).

Prints a markdown table (with the load average) and writes ``--work/budgets.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcompress import data
from kdcompress.artifacts import WEIGHTS_FILE, load_module
from kdcompress.context import StageContext
from kdcompress.errors import ArtifactError
from kdcompress.stages import decompose_tt, distill, prune
from kdcompress.training import accuracy

try:
    from common import mnist_arguments, trained_cnn
except ImportError:  # run as benchmarks/budgets_mnist.py from elsewhere
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import mnist_arguments, trained_cnn

LAYER_SETS = {"linear": [nn.Linear], "all": [nn.Linear, nn.Conv2d]}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def _scores(model: nn.Module, task: data.Task) -> dict[str, float]:
    return {"val": round(100 * accuracy(model, task, "val"), 2),
            "test": round(100 * accuracy(model, task, "test"), 2), "params": _params(model)}


class Results:
    """The JSON file of finished parts: a part found there is not computed again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def part(self, key: str, compute) -> Any:
        if key not in self.data:
            start = time.perf_counter()
            value = compute()
            value["seconds"] = round(time.perf_counter() - start, 1)
            value["load"] = _load()
            self.data[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)
            print(f"  {key}: {json.dumps({k: v for k, v in value.items() if k != 'plan'})}",
                  flush=True)
        return self.data[key]


def tt_part(teacher: nn.Module, task: data.Task, rank: int, layers: str,
            distill_epochs: int, method: str = "tt", uniform_method: str = "tt",
            seed: int = 0, distill_lr: float | None = None,
            keep_best: bool = False) -> dict[str, Any]:
    chosen = LAYER_SETS[layers]
    uniform = decompose_tt(teacher, rank=rank, layers=chosen, method=uniform_method)
    ctx = StageContext.standalone("budget", task)
    budgeted = decompose_tt(teacher, budget=_params(uniform), layers=chosen, method=method,
                            ctx=ctx)
    row: dict[str, Any] = {"uniform": _scores(uniform, task), "budget": _scores(budgeted, task),
                           "plan": {"budget": ctx.details["budget"],
                                    "layers": [{k: r.get(k) for k in ("name", "method", "rank",
                                                                      "predicted_drop",
                                                                      "params")}
                                               for r in ctx.details["layers"]]}}
    if distill_epochs:
        for name, student in (("uniform", uniform), ("budget", budgeted)):
            torch.manual_seed(seed)
            lr = {} if distill_lr is None else {"lr": distill_lr}
            kd_ctx = StageContext.standalone("student_kd", task, seed=seed)
            tuned = distill(student, teacher, epochs=distill_epochs, **lr, keep_best=keep_best,
                            ctx=kd_ctx)
            row[f"{name}_kd"] = _scores(tuned, task)
            if keep_best:
                row[f"{name}_kd"]["best_epoch"] = kd_ctx.details["best_epoch"]["epoch"]
    return row


def prune_part(teacher: nn.Module, task: data.Task, ratio: float, recovery: int,
               seed: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for allocation in ("uniform", "sensitivity"):
        ctx = StageContext.standalone("pruned", task)
        blunt = prune(teacher, ratio=ratio, allocation=allocation, recovery_epochs=0, ctx=ctx)
        row[allocation] = _scores(blunt, task)
        if allocation == "sensitivity":
            plan = ctx.details["allocation"]
            row["plan"] = {k: v for k, v in plan.items() if k != "groups"}
            row["plan"]["groups"] = [{k: g[k] for k in ("root", "ratio", "predicted_drop",
                                                        "uniform_removed", "removed")}
                                     for g in plan["groups"]]
        if recovery:
            torch.manual_seed(seed)
            repaired = prune(teacher, ratio=ratio, allocation=allocation,
                             recovery_epochs=recovery,
                             ctx=StageContext.standalone("pruned", task, seed=seed))
            row[f"{allocation}_kd"] = _scores(repaired, task)
    return row


def table(results: dict[str, Any]) -> str:
    lines = ["| comparison | params | val straight | val after KD | test after KD | seconds "
             "| load (1/5/15 min) |", "|---|---:|---:|---:|---:|---:|---|"]
    for key, row in results.items():
        pairs = (("uniform", "budget") if key.startswith("tt") else ("uniform", "sensitivity"))
        for name in pairs:
            kd = row.get(f"{name}_kd", {})
            lines.append(f"| {key} {name} | {row[name]['params']} | {row[name]['val']:.2f} | "
                         f"{kd.get('val', float('nan')):.2f} | {kd.get('test', float('nan')):.2f} "
                         f"| {row['seconds']} | {row['load']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mnist_arguments(parser, epochs=20, train_limit=20000, width=64)
    parser.add_argument("--work", type=Path, default=Path("runs/budgets_mnist"))
    parser.add_argument("--ranks", type=int, nargs="*", default=[4, 8],
                        help="uniform TT ranks to compare (none: skip part 1)")
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYER_SETS), default=["linear"])
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--distill-lr", type=float, nargs="+", default=[None],
                        help="learning rates of the distillation, each a part of its own "
                             "(default: distill's own, 2e-3)")
    parser.add_argument("--keep-best", action="store_true",
                        help="distil with keep_best=True (the best validation epoch, the start "
                             "counting as epoch 0), in both arms")
    parser.add_argument("--budget-method", choices=["tt", "svd", "auto"], default="tt",
                        help="decompose_tt(budget=..., method=...): 'auto' picks TT or SVD per "
                             "layer")
    parser.add_argument("--uniform-method", choices=["tt", "svd"], default="tt",
                        help="the factorisation of the uniform side, at every rank of --ranks")
    parser.add_argument("--prune-ratios", type=float, nargs="*", default=[0.5],
                        help="pruning ratios to compare (none: skip part 2)")
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the distillation and of the pruning recovery (each a "
                             "part of its own)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--teacher-module", type=Path, default=None,
                        help="a folder saved by kdcompress.artifacts.save_module: the teacher, "
                             "instead of training the flagship CNN")
    parser.add_argument("--digits", action="store_true",
                        help="check the script on scikit-learn's digits instead of MNIST")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.torch_threads))
    if args.digits:
        task = data.digits()
    else:
        task = data.mnist(args.data)
        if args.train_limit:  # 0: all training images
            task = data.limit_train(task, args.train_limit)
    if args.teacher_module is None:
        teacher = trained_cnn(task, args.width, args.epochs, args.cache).eval()
        tag = ""
    else:
        try:
            teacher = load_module(args.teacher_module)
        except ArtifactError as exc:
            parser.error(f"--teacher-module: {exc}")
        digest = hashlib.sha256((args.teacher_module / WEIGHTS_FILE).read_bytes()).hexdigest()
        tag = f"-{digest[:12]}"  # results of another teacher go to a file of their own
    print(f"teacher: {_params(teacher)} params, val {100 * accuracy(teacher, task, 'val'):.2f}",
          flush=True)
    results = Results(args.work / f"budgets-{task.fingerprint[:12]}{tag}.json")
    for layers in args.layers:
        for rank in args.ranks:
            suffix = "" if args.budget_method == "tt" else f" {args.budget_method}"
            if args.uniform_method != "tt":
                suffix += f" vs {args.uniform_method}"
            for lr, seed in itertools.product(args.distill_lr, args.seeds):
                results.part(f"tt r{rank} {layers}{suffix}" + (f" s{seed}" if seed else "")
                             + ("" if lr is None else f" lr{lr:g}")
                             + (" best" if args.keep_best else ""),
                             lambda r=rank, lay=layers, s=seed, lr=lr: tt_part(
                                 teacher, task, r, lay, args.distill_epochs, args.budget_method,
                                 args.uniform_method, s, lr, args.keep_best))
    for ratio in args.prune_ratios:
        for seed in args.seeds:
            results.part(f"prune {ratio}" + (f" s{seed}" if seed else ""),
                         lambda r=ratio, s=seed: prune_part(teacher, task, r,
                                                            args.recovery_epochs, s))
    print(table(results.data))
    for key, row in results.data.items():
        print(f"\n{key}: {json.dumps(row.get('plan'))}")


if __name__ == "__main__":
    main()
