"""Dropout options of the built-in CNN and MLP: off by default, placed where the docs say."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcompress import models
from kdcompress.errors import PipelineError
from kdcompress.fingerprint import fingerprint_constant


def test_no_dropout_by_default_keeps_the_recipe_and_module_tree():
    assert set(models.cnn().kwargs) == {"width", "hidden", "input_shape", "num_classes", "seed"}
    assert set(models.mlp().kwargs) == {"hidden", "input_shape", "num_classes", "seed"}
    assert fingerprint_constant(models.cnn(dropout=0.0)) == fingerprint_constant(models.cnn())
    for spec in (models.cnn(width=8), models.mlp()):
        model = spec.build((1, 8, 8), 10)
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_cnn_dropout_before_the_last_layer_and_same_weights():
    plain = models.cnn(width=8, hidden=16).build((1, 8, 8), 10)
    dropped = models.cnn(width=8, hidden=16, dropout=0.5).build((1, 8, 8), 10)
    names = [n for n, _ in dropped.classifier.named_children()]
    assert names == ["flatten", "fc1", "relu", "drop", "fc2"]
    assert dropped.classifier.drop.p == 0.5
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    for key, value in plain.state_dict().items():  # same seed, same initial weights
        torch.testing.assert_close(dropped.state_dict()[key], value)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))  # identity in eval mode
    torch.manual_seed(0)
    a = dropped.train()(x)
    b = dropped(x)
    assert not torch.equal(a, b)  # active while training


def test_mlp_hidden_and_input_dropout_as_in_hinton():
    model = models.mlp(hidden=(32, 16), dropout=0.5, input_dropout=0.2).build((1, 8, 8), 10)
    drops = {n: m.p for n, m in model.layers.named_children() if isinstance(m, nn.Dropout)}
    assert drops == {"drop0": 0.2, "drop1": 0.5, "drop2": 0.5}
    order = [n for n, _ in model.layers.named_children()]
    assert order.index("drop0") == 1 and order.index("drop1") == order.index("relu1") + 1


@pytest.mark.parametrize("make, key, value", [
    (lambda v: models.cnn(dropout=v), "dropout", 1.0),
    (lambda v: models.mlp(dropout=v), "dropout", -0.1),
    (lambda v: models.mlp(input_dropout=v), "input_dropout", "0.2"),
])
def test_dropout_outside_0_1_is_refused(make, key, value):
    with pytest.raises(PipelineError, match=rf"{key} is a probability with 0 <= {key} < 1, "
                                            rf"but got {value!r}"):
        make(value)
