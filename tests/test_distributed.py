"""Data-parallel runs under torchrun: two CPU processes (gloo), rank 0 writes, all agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcompress import distributed
from kdcompress.artifacts import load_module

PIPELINES = Path(__file__).parent / "pipelines"


def test_outside_torchrun_everything_is_single_process():
    assert distributed.world_size() == 1
    assert distributed.rank() == 0 and distributed.is_main()
    assert distributed.all_gather("x") == ["x"]
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model


def _torchrun(pipeline: Path, out: Path) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a free local port, so runs never collide on a fixed one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "kdcompress", "run", str(pipeline), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env)


def _failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed torchrun printed: the workers' own errors come before torchrun's summary
    in stderr, so keep enough of it to show a worker's abort, not only the launcher's."""
    return proc.stdout[-2000:] + "\n--- stderr ---\n" + proc.stderr[-12000:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_torchrun_two_processes_train_data_parallel(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(PIPELINES / "tiny.py", out)
    assert proc.returncode == 0, _failure(proc)
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert [s["name"] for s in report["stages"]] == ["teacher", "student"]
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in report["stages"])
    # rank 0 alone writes: one artifact per stage, and no leftover temporary folders
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["student", "teacher"]
    assert load_module(out / "stages" / "student")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # the report line is printed once, by rank 0
    assert proc.stdout.count("report: ") == 1


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_torchrun_distill_with_adapters_matches_across_processes(tmp_path):
    """distill runs data-parallel too; its feature adapter's gradients are averaged."""
    out = tmp_path / "run"
    proc = _torchrun(PIPELINES / "tiny_distill.py", out)
    assert proc.returncode == 0, _failure(proc)
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    student = report["stages"][1]
    assert student["name"] == "student" and student["accuracy"] > 0.3
    assert "fitnet" in " ".join(student["details"]["loss_parts"])
    # keep_best under two processes: rank 0's verdict is shared, one epoch is recorded
    assert student["details"]["best_epoch"]["epoch"] in (0, 1, 2, 3)
