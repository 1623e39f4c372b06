"""A CIFAR-style ResNet: a 3x3 stem, three stages of residual basic blocks, global pooling.

References
----------
.. [1] K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
   CVPR 2016 (section 4.2: the 6n+2-layer networks for CIFAR-10).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kdcompress.errors import PipelineError
from kdcompress.recipes._shapes import downsample, image_shape

__all__ = ["ResNet", "BasicBlock", "check_depth"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a shortcut, added before the last ReLU.

    The shortcut is the identity, or a 1x1 conv + BatchNorm where the block changes the
    channel count or the resolution (option B of [1]_).

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    stride : int
        Stride of the first conv (2 halves the resolution).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(c_out)),
            ]))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def check_depth(depth: object) -> int:
    """``depth`` as an int of the form ``6n + 2`` (8, 14, 20, 32, ...), else a PipelineError."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        near = ""
        if isinstance(depth, int) and not isinstance(depth, bool):
            n = max(1, round((depth - 2) / 6))
            near = f" (nearest: {6 * n + 2})"
        raise PipelineError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56), "
                            f"but got {depth!r}{near}")
    return depth


class ResNet(nn.Module):
    """A ResNet of ``depth = 6n + 2`` layers for small images (He et al. 2016, section 4.2).

    A 3x3 stem with ``width`` channels, then three stages of ``n`` :class:`BasicBlock` with
    ``width``, ``2 * width`` and ``4 * width`` channels; the second and third stages halve the
    resolution while it is above 7 (8x8 digits: 8 -> 4 -> 4; 28x28 MNIST: 28 -> 14 -> 7), then
    global average pooling and one Linear layer.

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)`` of one input.
    num_classes : int
        Number of output logits.
    depth : int
        ``6n + 2``: 8, 14, 20, 32, ...
    width : int
        Channels of the stem and the first stage.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 20,
                 width: int = 16) -> None:
        super().__init__()
        c, h, w = image_shape("resnet", input_shape)
        n = (check_depth(depth) - 2) // 6
        self.stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(c, width, 3, padding=1, bias=False)),
            ("bn", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU(inplace=True)),
        ]))
        stages: list[tuple[str, nn.Module]] = []
        c_in = width
        for i, c_out in enumerate([width, 2 * width, 4 * width], 1):
            stride = 2 if i > 1 and downsample(min(h, w)) else 1
            if stride == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
            blocks = [BasicBlock(c_in, c_out, stride)]
            blocks += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append((f"stage{i}", nn.Sequential(*blocks)))
            c_in = c_out
        self.stages = nn.Sequential(OrderedDict(stages))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))
