"""A MobileNetV2 for small images: inverted residual blocks of depthwise-separable convolutions.

References
----------
.. [1] M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen, "MobileNetV2: Inverted
   Residuals and Linear Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kdcompress.recipes._shapes import downsample, image_shape

__all__ = ["MobileNetV2", "InvertedResidual"]


def _conv_bn(c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2,
                           groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(c_out)),
    ]
    if relu:
        layers.append(("relu", nn.ReLU6(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class InvertedResidual(nn.Module):
    """Expand (1x1), filter (3x3 depthwise), project (1x1, linear); the input is added back when
    the shapes match (stride 1, same channels) -- the block of [1]_, figure 3.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    stride : int
        Stride of the depthwise conv.
    expansion : int
        The expanded width is ``expansion * c_in``; 1 skips the expanding conv.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expansion: int = 4) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = _conv_bn(c_in, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = _conv_bn(hidden, c_out, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 [1]_ scaled for small images.

    A 3x3 stem with ``width`` channels, then four stages of :class:`InvertedResidual` blocks
    (expansion, channels, repeats) = (1, w, 1), (e, 3w/2, 2), (e, 2w, 3), (e, 4w, 3), a 1x1 conv
    to ``8 * width`` channels, global average pooling and one Linear layer. The second and third
    stages halve the resolution while it is above 7 (8x8: 8 -> 4 -> 4; 28x28: 28 -> 14 -> 7);
    the stem keeps it (the ImageNet network's stride-2 stem suits 224x224 inputs, not these).

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)`` of one input.
    num_classes : int
        Number of output logits.
    width : int
        Channels of the stem (a multiple of 8 keeps every layer a multiple of 4).
    expansion : int
        Expansion factor of the inverted residual blocks (6 in [1]_).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16,
                 expansion: int = 4) -> None:
        super().__init__()
        c, h, w = image_shape("mobilenet", input_shape)
        self.stem = _conv_bn(c, width, 3)
        settings = [(1, width, 1, 1), (expansion, width * 3 // 2, 2, 2),
                    (expansion, 2 * width, 3, 2), (expansion, 4 * width, 3, 1)]
        blocks: list[nn.Module] = []
        c_in = width
        for t, c_out, repeats, s in settings:
            stride = 2 if s == 2 and downsample(min(h, w)) else 1
            if stride == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
            for i in range(repeats):
                blocks.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, t))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(c_in, 8 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.fc(self.flatten(self.pool(self.head(self.blocks(self.stem(x))))))
