"""The search's constraint is on the pipeline's metric, not on top-1 accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.options import RunOptions
from kdcompress.search.study import Search, SearchConfig
from kdcompress.stages import train


def scale(model: nn.Module, *, factor: float = 1.0) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


def test_the_search_constrains_the_drop_of_the_pipeline_metric(fast_measure, tmp_path):
    task = data.digits()
    pipeline = Pipeline("f1search", data=task, seed=0, metric="macro_f1")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16),
                             epochs=1)
    pipeline.stage(scale, out="scaled", model=teacher, factor=ks.choice([1.0, 0.0]))
    search = Search(pipeline, SearchConfig(objectives=("size",), max_drop=100.0),
                    RunOptions(out=tmp_path / "run", measure=fast_measure, plot=False))
    search.study.enqueue_trial({"scaled.factor": 0.0})
    search.optimize(trials=1)
    attrs = search.study.trials[0].user_attrs
    _, yv = task.arrays("val")
    constant = np.zeros(len(yv), dtype=np.int64)  # zero weights: every logit 0, class 0 wins
    expected = f1_score(yv.numpy(), constant, average="macro")
    assert attrs["metric"] == "macro_f1"
    assert attrs["val_accuracy"] == pytest.approx(expected, abs=1e-6)  # macro-F1, not top-1
    assert abs(expected - float((yv == 0).float().mean())) > 0.05
    assert attrs["drop"] == pytest.approx(100 * (attrs["baseline_val_accuracy"] - expected),
                                          abs=1e-4)
