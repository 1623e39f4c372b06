"""Placement of the training data, automatic batch size and training precision."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdcompress import data, models
from kdcompress.context import StageContext
from kdcompress.errors import PipelineError, StageError
from kdcompress.placement import (
    BASE_BATCH,
    ResidentBatches,
    auto_batch,
    autocast_dtype,
    decide_placement,
    make_sampler,
)
from kdcompress.stages import distill, train
from kdcompress.training import FitConfig, _Indexed, accuracy, fit


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("with_index", [False, True])
def test_resident_batches_equal_the_dataloader_s(drop_last: bool, with_index: bool) -> None:
    """Gathering from resident tensors gives exactly the DataLoader's batches, same order."""
    x = torch.randn(203, 3, 4)
    y = torch.randint(0, 5, (203,))
    dataset = TensorDataset(x, y)
    loader_set = _Indexed(dataset) if with_index else dataset
    reference = DataLoader(loader_set, batch_size=16, drop_last=drop_last,
                           sampler=make_sampler(loader_set, seed=7, parallel=False))
    resident = ResidentBatches((x, y), make_sampler(dataset, seed=7, parallel=False),
                               batch_size=16, drop_last=drop_last, with_index=with_index)
    expected, got = list(reference), list(resident)
    assert len(got) == len(resident) == len(expected) == (12 if drop_last else 13)
    for a, b in zip(expected, got, strict=True):
        assert len(a) == len(b) == (3 if with_index else 2)
        for ta, tb in zip(a, b, strict=True):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    # a sample is drawn once per epoch, and another seed draws another order
    seen = torch.cat([b[0] for b in ResidentBatches((torch.arange(203), y),
                                                    make_sampler(dataset, seed=7, parallel=False),
                                                    batch_size=16)])
    assert sorted(seen.tolist()) == list(range(203))
    other = next(iter(ResidentBatches((x, y), make_sampler(dataset, seed=8, parallel=False),
                                      batch_size=16)))
    assert not torch.equal(other[0], got[0][0])


def test_placement_decisions() -> None:
    tensors = TensorDataset(torch.zeros(1000, 256), torch.zeros(1000, dtype=torch.long))
    size = 1000 * 256 * 4 + 1000 * 8
    cpu = decide_placement(tensors, "cpu")
    assert cpu.resident and cpu.data_bytes == size and "gathered from them directly" in cpu.reason
    # CUDA decisions from the free memory (given here: no GPU needed to decide)
    fits = decide_placement(tensors, "cuda", free_bytes=4 * size)
    assert fits.resident and fits.free_bytes == 4 * size and "kept there" in fits.reason
    too_big = decide_placement(tensors, "cuda", free_bytes=size)  # over half of the free memory
    assert not too_big.resident and "pinned memory" in too_big.reason

    class Lazy(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return torch.zeros(3), 0

    lazy = decide_placement(Lazy(), "cuda", free_bytes=2**40)
    assert not lazy.resident and lazy.data_bytes is None and "Lazy" in lazy.reason
    assert set(lazy.as_dict()) == {"resident", "device", "data_bytes", "free_bytes", "reason"}


def test_auto_batch_rules() -> None:
    assert auto_batch(32, 1e-3, samples=55000, device="cuda", optimizer="adamw").batch_size == 32
    user = auto_batch(32, 1e-3, samples=55000, device="cuda", optimizer="sgd")
    assert (user.batch_size, user.lr, user.rule) == (32, 1e-3, "set by the user")
    cpu = auto_batch(None, 1e-3, samples=55000, device="cpu", optimizer="adamw")
    assert (cpu.batch_size, cpu.lr) == (BASE_BATCH, 1e-3)
    adam = auto_batch(None, 1e-3, samples=55000, device="cuda", optimizer="adamw")
    assert adam.batch_size == 512 and adam.lr == pytest.approx(1e-3 * math.sqrt(8))
    assert "square-root" in adam.rule and "107 steps per epoch" in adam.rule
    sgd = auto_batch(None, 0.05, samples=55000, device="cuda", optimizer="sgd")
    assert sgd.batch_size == 512 and sgd.lr == pytest.approx(0.4) and "linear" in sgd.rule
    # an epoch keeps at least 100 steps: 20,000 samples -> 128 (156 steps), not 256 (78)
    assert auto_batch(None, 1e-3, samples=20000, device="cuda",
                      optimizer="adamw").batch_size == 128
    small = auto_batch(None, 1e-3, samples=1437, device="cuda", optimizer="adamw")
    assert (small.batch_size, small.lr) == (64, 1e-3) and "no room" in small.rule
    # under torchrun the batch is per process: two processes halve the room
    assert auto_batch(None, 1e-3, samples=55000, device="cuda", optimizer="adamw",
                      world_size=2).batch_size == 256


def test_precision_rules() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", True, cpu, "s") == (None, False)
    assert autocast_dtype("auto", True, cuda, "s") == (torch.float16, True)
    assert autocast_dtype("auto", False, cuda, "s") == (None, False)
    assert autocast_dtype("bf16", True, cpu, "s") == (torch.bfloat16, False)
    assert autocast_dtype("fp32", True, cuda, "s") == (None, False)
    with pytest.raises(StageError, match=r"stage 'teacher': precision='fp16' needs CUDA.*bf16"):
        autocast_dtype("fp16", True, cpu, "teacher")


@pytest.fixture(scope="module")
def task() -> data.Task:
    return data.digits()


def test_fit_records_its_choices_and_trains_in_bf16_on_the_cpu(task: data.Task) -> None:
    torch.manual_seed(0)
    model = models.cnn(width=8).build(task.input_shape, task.num_classes)
    dtypes = []

    def loss_fn(net, x, y):
        out = net(x)
        dtypes.append(out.dtype)
        return F.cross_entropy(out.float(), y)

    ctx = StageContext.standalone("teacher", task)
    result = fit(model, loss_fn, task, config=FitConfig(epochs=3, lr=1e-2, precision="bf16"),
                 ctx=ctx)
    assert set(dtypes) == {torch.bfloat16}  # the forward pass ran under bfloat16 autocast
    assert result.val_accuracy > 0.8
    assert ctx.details["precision"] == "bfloat16"
    assert ctx.details["batch"]["batch_size"] == 64
    assert ctx.details["data_placement"]["resident"] is True
    assert result.steps == 3 * math.ceil(len(task.split("train")) / 64)


def test_fp16_on_the_cpu_is_refused_before_training(task: data.Task) -> None:
    with pytest.raises(StageError, match="precision='fp16' needs CUDA"):
        train(models.cnn(width=4), epochs=1, precision="fp16", data=task)
    with pytest.raises(PipelineError, match="precision must be one of"):
        train(models.cnn(width=4), epochs=1, precision="half", data=task)


def test_training_is_repeatable_and_a_user_batch_is_kept(task: data.Task) -> None:
    ctx = StageContext.standalone("teacher", task)
    a = train(models.cnn(width=4), epochs=1, batch_size=32, ctx=ctx)
    b = train(models.cnn(width=4), epochs=1, batch_size=32, data=task)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert ctx.details["batch"] == {"batch_size": 32, "lr": 2e-3, "rule": "set by the user",
                                    "lr_factor": 1.0}
    assert accuracy(a, task) > 0.3


def test_teacher_cache_auto_decisions(task: data.Task, monkeypatch) -> None:
    from kdcompress.augment import Noise
    from kdcompress.losses import KD

    teacher = train(models.cnn(width=4), epochs=1, data=task)
    ctx = StageContext.standalone("student_kd", task)
    distill(models.cnn(width=4), teacher, loss=KD(), epochs=1, ctx=ctx)
    assert ctx.details["teacher_cache"].startswith("on: ")
    ctx = StageContext.standalone("student_kd", task)
    distill(models.cnn(width=4), teacher, loss=KD(), epochs=1, transforms=[Noise(0.1)], ctx=ctx)
    assert ctx.details["teacher_cache"].startswith("off: transforms=")
    assert not ctx.warnings  # "auto" declines quietly; True would warn
    module = importlib.import_module("kdcompress.stages.distill")  # the function shadows it
    monkeypatch.setattr(module, "CACHE_LIMIT_BYTES", 100)
    ctx = StageContext.standalone("student_kd", task)
    distill(models.cnn(width=4), teacher, loss=KD(), epochs=1, ctx=ctx)
    assert "over the" in ctx.details["teacher_cache"] and not ctx.warnings


def test_gpu_check_skips_with_a_message_without_cuda() -> None:
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "gpu_check: skipped: PyTorch sees no CUDA GPU" in done.stdout
