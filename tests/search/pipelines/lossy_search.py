"""Every value of the search parameter ruins the teacher: no trial can meet a budget of 0.5
points."""

import torch
from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.stages import train


def damage(model: nn.Module, *, noise: float = 1.0) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model.classifier.fc2.weight
        w.add_(noise * w.abs().mean() * torch.randn(w.shape, generator=generator))
    return model


pipeline = Pipeline("lossy_search", data=data.digits(), seed=0)
teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16), epochs=3)
damaged = pipeline.stage(damage, out="damaged", model=teacher,
                         noise=ks.choice([20.0, 40.0], default=20.0))
