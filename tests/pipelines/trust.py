"""A model the file builds itself, a user stage that can pause, and an ONNX export.

The run-folder trust tests tamper with what this pipeline leaves behind.
"""

import os
import time

import torch
from torch import nn

from kdcompress import Pipeline, data
from kdcompress.stages import export_onnx


class MyNet(nn.Module):
    """A linear classifier of 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def shift(model: nn.Module, *, pause: float = 0.0) -> nn.Module:
    """Move the bias a little; with ``pause``, say so in $KDC_TEST_INSIDE and sleep."""
    if pause:
        marker = os.environ.get("KDC_TEST_INSIDE")
        if marker:
            open(marker, "w").close()
        time.sleep(pause)
    with torch.no_grad():
        model.fc.bias.add_(0.1)
    return model


net = MyNet()  # built before Pipeline(...), unseeded: the CLI seeds before running the file
pipeline = Pipeline("trust", data=data.digits(), seed=0)
base = pipeline.stage(shift, out="base", model=net)
moved = pipeline.stage(shift, out="moved", model=base,
                       pause=float(os.environ.get("KDC_TEST_PAUSE", "0")))
fp32 = pipeline.stage(export_onnx, out="fp32", model=moved)
