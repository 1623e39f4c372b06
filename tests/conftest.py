"""Shared fixtures of the engine tests: tiny data, fast measurement, no plotting unless asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcompress import OnnxModel, data, models
from kdcompress.metrics import MeasureConfig

#: Pipeline files and worker scripts the tests run; not test modules (``--doctest-modules`` would
#: import them, and some are broken on purpose).
collect_ignore_glob = ["pipelines/*.py", "analysis/pipelines/*.py", "search/pipelines/*.py",
                       "search/worker.py"]

# The suite shares two cores with whatever else runs; one intra-op thread avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_task() -> data.Task:
    """scikit-learn's 8x8 digits, the embedded default data."""
    return data.digits()


@pytest.fixture(scope="session")
def trained_cnn(digits_task: data.Task) -> nn.Module:
    """``models.cnn(width=16, hidden=64)`` trained 4 epochs on digits, shared by the stage tests
    (stages copy their inputs, so no test can change it for another)."""
    from kdcompress.stages import train

    return train(models.cnn(width=16, hidden=64), epochs=4, data=digits_task)


@pytest.fixture(scope="session")
def cnn_onnx(trained_cnn: nn.Module, digits_task: data.Task) -> OnnxModel:
    """:func:`trained_cnn` exported to ONNX (fp32)."""
    from kdcompress.stages import export_onnx

    return export_onnx(trained_cnn, data=digits_task)


@pytest.fixture(scope="session")
def tiny_task() -> data.Task:
    """96 training and 48 test images of shape (1, 8, 8) in 4 classes; measures in milliseconds."""
    g = torch.Generator().manual_seed(0)
    y_train = torch.arange(96) % 4
    y_test = torch.arange(48) % 4
    x_train = torch.randn(96, 1, 8, 8, generator=g) + y_train.view(-1, 1, 1, 1)
    x_test = torch.randn(48, 1, 8, 8, generator=g) + y_test.view(-1, 1, 1, 1)
    return data.from_tensors(x_train, y_train, x_test, y_test, name="tiny")


@pytest.fixture(scope="session")
def fast_measure() -> MeasureConfig:
    """Two timed runs after one warm-up: enough to fill every field of a row."""
    return MeasureConfig(repeats=2, warmup=1, min_seconds=0.0)
