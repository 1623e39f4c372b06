"""A 1-D CNN for sequence inputs ``(channels, length)``: the 1-D twin of ``models.cnn()``."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kdcompress.errors import PipelineError

__all__ = ["CNN1d", "MAX_LENGTH"]

#: Each conv block halves the sequence (max-pooling) while it is longer than this.
MAX_LENGTH = 16


class CNN1d(nn.Module):
    """Three ``Conv1d -> BatchNorm1d -> ReLU`` blocks with max-pooling, then two Linear layers.

    Each block halves the length while it is above :data:`MAX_LENGTH` (length 32 -> 16;
    128 -> 64 -> 32 -> 16); most parameters sit in ``classifier.fc1``, the layer tensor-train
    decomposition compresses, as in :class:`kdcompress.models.CNN`.

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, length)`` of one input.
    num_classes : int
        Number of output logits.
    width : int
        Channels of the last conv blocks (the first has ``width // 2``).
    hidden : int
        Width of the hidden fully connected layer.
    kernel : int
        Kernel size of the convolutions (odd: the length is kept before pooling).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64,
                 hidden: int = 128, kernel: int = 5) -> None:
        super().__init__()
        if len(input_shape) != 2:
            hint = "models.cnn() or models.resnet()" if len(input_shape) == 3 else "models.mlp()"
            raise PipelineError(f"cnn1d needs sequence inputs of shape (channels, length), but "
                                f"the data has shape {tuple(input_shape)}; use {hint}")
        if kernel < 1 or kernel % 2 == 0:
            raise PipelineError(f"cnn1d: kernel must be an odd size >= 1, but got {kernel}")
        c, length = (int(s) for s in input_shape)
        layers: list[tuple[str, nn.Module]] = []
        for i, (a, b) in enumerate([(c, width // 2), (width // 2, width), (width, width)], 1):
            layers += [(f"conv{i}", nn.Conv1d(a, b, kernel, padding=kernel // 2, bias=False)),
                       (f"bn{i}", nn.BatchNorm1d(b)), (f"relu{i}", nn.ReLU(inplace=True))]
            if length > MAX_LENGTH:
                layers.append((f"pool{i}", nn.MaxPool1d(2)))
                length //= 2
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(width * length, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, num_classes)
        return self.classifier(self.features(x))
