"""Which layers :func:`kdcompress.layers.tensorize.tensorize` picks from a layer type."""

from __future__ import annotations

import pytest
from torch import nn

from kdcompress.errors import LayerError
from kdcompress.layers.tensorize import select_layers, tensorize
from kdcompress.recipes.mobilenet import MobileNetV2


def _depthwise_block() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 16, 4))


def test_a_type_selects_only_the_convolutions_that_can_be_decomposed() -> None:
    assert select_layers(_depthwise_block(), nn.Conv2d) == ["0", "2"]


def test_naming_a_depthwise_convolution_is_still_an_error() -> None:
    with pytest.raises(LayerError, match="groups=16"):
        tensorize(_depthwise_block(), layers=["1"], rank=2)


def test_mobilenet_convolutions_decompose_by_type() -> None:
    model = MobileNetV2((1, 8, 8), 10)
    names = select_layers(model, nn.Conv2d)
    modules = dict(model.named_modules())
    assert names and all(modules[n].groups == 1 for n in names)
    tensorize(model, layers=nn.Conv2d, rank=2)  # no depthwise convolution refused
    assert any(m.groups > 1 for m in modules.values() if isinstance(m, nn.Conv2d))
