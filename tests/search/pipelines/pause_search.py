"""Teacher, then a stage that pauses for $KDC_TEST_PAUSE seconds (0 when unset): trials that take
long enough to be killed mid-way, or to overlap between two workers."""

import os
import time

import torch
from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.stages import train


def pause(model: nn.Module, *, factor: float = 1.0) -> nn.Module:
    time.sleep(float(os.environ.get("KDC_TEST_PAUSE", "0")))
    with torch.no_grad():
        model.classifier.fc2.weight.mul_(factor)
    return model


pipeline = Pipeline("pause_search", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16), epochs=1)
paused = pipeline.stage(pause, out="paused", model=teacher,
                        factor=ks.choice([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], default=1.0))
