"""Built-in models that adapt to the pipeline's data.

``cnn()`` and ``mlp()`` return a :class:`ModelSpec`, a recipe that the pipeline builds once it knows
the data's input shape and class count, so one pipeline file runs on digits (1x8x8) and MNIST
(1x28x28) unchanged. Pass ``input_shape`` and ``num_classes`` and call :meth:`ModelSpec.build` to
get a module directly.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdcompress.errors import PipelineError
from kdcompress.recipes.resnet import check_depth
from kdcompress.recipes.vit import check_vit

__all__ = ["ModelSpec", "CNN", "MLP", "cnn", "mlp", "as_module", "resnet", "mobilenet",
           "transformer", "cnn1d"]


@dataclass(frozen=True)
class ModelSpec:
    """A model recipe: a factory (``"package.module:name"``) and its keyword arguments.

    ``input_shape`` and ``num_classes`` are filled from the data when not given.
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, input_shape: tuple[int, ...] | None = None,
              num_classes: int | None = None) -> nn.Module:
        """Instantiate the model, filling in the data's shape and class count where missing."""
        kwargs = dict(self.kwargs)
        if kwargs.get("input_shape") is None:
            kwargs["input_shape"] = input_shape
        if kwargs.get("num_classes") is None:
            kwargs["num_classes"] = num_classes
        if kwargs["input_shape"] is None or kwargs["num_classes"] is None:
            raise PipelineError(f"model {self} needs input_shape and num_classes: give them, or "
                                "use it inside a Pipeline, which takes them from its data")
        module_name, _, attr = self.factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        torch.manual_seed(int(kwargs.pop("seed", 0) or 0))
        return factory(**kwargs)

    def __repr__(self) -> str:
        name = self.factory.rpartition(":")[2].lower()
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()
                         if v is not None and k != "seed")
        return f"{name}({args})"

    def __kdc_fingerprint__(self) -> Any:
        return {"factory": self.factory, "kwargs": self.kwargs}


def as_module(model: nn.Module | ModelSpec, data: Any = None) -> nn.Module:
    """Return ``model`` as a module, building a :class:`ModelSpec` for ``data``'s shapes."""
    if isinstance(model, ModelSpec):
        shape = data.input_shape if data is not None else None
        classes = data.num_classes if data is not None else None
        return model.build(shape, classes)
    if not isinstance(model, nn.Module):
        raise PipelineError(f"expected a torch model (nn.Module or models.cnn()/mlp()), but got "
                            f"{type(model).__name__}")
    return model


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class CNN(nn.Module):
    """A small VGG-style classifier: three 3x3 conv blocks, max-pooling, two Linear layers.

    The feature extractor pools until the spatial size is at most 7 (8x8 digits -> 4x4,
    28x28 MNIST -> 7x7); most parameters sit in ``classifier.fc1``, the layer that
    tensor-train decomposition compresses.

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)`` of one input.
    num_classes : int
        Number of output logits.
    width : int
        Channels of the last conv blocks (the first has ``width // 2``).
    hidden : int
        Width of the hidden fully connected layer.
    dropout : float
        Dropout probability before the last layer (``classifier.drop``, after ``fc1``'s ReLU);
        0 (the default) adds no module.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64,
                 hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        _check_dropout("CNN", "dropout", dropout)
        if len(input_shape) != 3:
            raise PipelineError(f"CNN needs inputs of shape (channels, height, width), but the "
                                f"data has shape {tuple(input_shape)}; use models.mlp()")
        c, h, w = input_shape
        layers: list[tuple[str, nn.Module]] = []
        names = ["conv", "bn", "relu"]
        for i, (a, b) in enumerate([(c, width // 2), (width // 2, width), (width, width)], 1):
            layers += [(f"{n}{i}", m) for n, m in zip(names, _conv_block(a, b), strict=True)]
            if i >= 2 and min(h, w) > 7:
                layers.append((f"pool{i}", nn.MaxPool2d(2)))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(OrderedDict(layers))
        head: list[tuple[str, nn.Module]] = [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(width * h * w, hidden)),
            ("relu", nn.ReLU(inplace=True)),
        ]
        if dropout:
            head.append(("drop", nn.Dropout(dropout)))
        head.append(("fc2", nn.Linear(hidden, num_classes)))
        self.classifier = nn.Sequential(OrderedDict(head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A multi-layer perceptron on flattened inputs.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one input (flattened).
    num_classes : int
        Number of output logits.
    hidden : tuple of int
        Widths of the hidden layers.
    dropout : float
        Dropout probability after each hidden layer's ReLU (``drop1``, ``drop2``, ...).
    input_dropout : float
        Dropout probability on the flattened input (``drop0``). Hinton et al.'s MNIST teacher
        ("Distilling the Knowledge in a Neural Network", 2015, after Hinton et al., "Improving
        neural networks by preventing co-adaptation of feature detectors", 2012) used two hidden
        layers of 1200 units, ``dropout=0.5`` and ``input_dropout=0.2``. Both 0 by default,
        which adds no module.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] = (256, 128), dropout: float = 0.0,
                 input_dropout: float = 0.0) -> None:
        super().__init__()
        _check_dropout("MLP", "dropout", dropout)
        _check_dropout("MLP", "input_dropout", input_dropout)
        features = 1
        for s in input_shape:
            features *= s
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        if input_dropout:
            layers.append(("drop0", nn.Dropout(input_dropout)))
        for i, width in enumerate(hidden, 1):
            layers += [(f"fc{i}", nn.Linear(features, width)), (f"relu{i}", nn.ReLU(inplace=True))]
            if dropout:
                layers.append((f"drop{i}", nn.Dropout(dropout)))
            features = width
        layers.append(("head", nn.Linear(features, num_classes)))
        self.layers = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B, num_classes)
        return self.layers(x)


def cnn(*, width: int = 64, hidden: int = 256, dropout: float = 0.0,
        input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
        seed: int = 0) -> ModelSpec:
    """A :class:`CNN` recipe; shapes come from the pipeline's data unless given.

    ``dropout`` (0 <= p < 1) adds dropout before the last layer; it is off by default, and the
    recipe (and its cache key) is then the same as without the option.

    Examples
    --------
    >>> model = cnn(width=32, input_shape=(1, 8, 8), num_classes=10).build()
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> cnn(width=32, dropout=0.3)
    cnn(width=32, hidden=256, dropout=0.3)
    """
    _check_dropout("cnn", "dropout", dropout)
    return ModelSpec("kdcompress.models:CNN", {"width": width, "hidden": hidden,
                                               **_dropouts(dropout=dropout),
                                               "input_shape": _tuple(input_shape),
                                               "num_classes": num_classes, "seed": seed})


def mlp(*, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.0,
        input_dropout: float = 0.0, input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None, seed: int = 0) -> ModelSpec:
    """An :class:`MLP` recipe; shapes come from the pipeline's data unless given.

    ``dropout`` after each hidden layer and ``input_dropout`` on the input are off by default
    (see :class:`MLP` for Hinton et al.'s setting).

    Examples
    --------
    >>> mlp(hidden=(1200, 1200), dropout=0.5, input_dropout=0.2)
    mlp(hidden=(1200, 1200), dropout=0.5, input_dropout=0.2)
    """
    _check_dropout("mlp", "dropout", dropout)
    _check_dropout("mlp", "input_dropout", input_dropout)
    return ModelSpec("kdcompress.models:MLP", {"hidden": tuple(hidden),
                                               **_dropouts(dropout=dropout,
                                                           input_dropout=input_dropout),
                                               "input_shape": _tuple(input_shape),
                                               "num_classes": num_classes, "seed": seed})


def _check_dropout(where: str, key: str, p: object) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise PipelineError(f"{where}: {key} is a probability with 0 <= {key} < 1, but got "
                            f"{p!r}")


def _dropouts(**probabilities: float) -> dict[str, float]:
    """The non-zero dropout settings: a recipe without dropout keeps its old keywords (and so
    its cache key)."""
    return {k: float(v) for k, v in probabilities.items() if v}


def _tuple(shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if shape is None else tuple(int(s) for s in shape)


# ----------------------------------------------------------------------------------------------
# recipes of kdcompress.recipes: ResNet, MobileNetV2, ViT, 1-D CNN


def resnet(*, depth: int = 20, width: int = 16, input_shape: tuple[int, ...] | None = None,
           num_classes: int | None = None, seed: int = 0) -> ModelSpec:
    """A CIFAR-style :class:`~kdcompress.recipes.ResNet` recipe (``depth = 6n + 2``).

    Examples
    --------
    >>> model = resnet(depth=8, width=8, input_shape=(1, 8, 8), num_classes=10).build()
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    check_depth(depth)
    return _recipe("resnet:ResNet", depth=depth, width=width, input_shape=input_shape,
                   num_classes=num_classes, seed=seed)


def mobilenet(*, width: int = 16, expansion: int = 4, input_shape: tuple[int, ...] | None = None,
              num_classes: int | None = None, seed: int = 0) -> ModelSpec:
    """A :class:`~kdcompress.recipes.MobileNetV2` recipe (inverted residual blocks)."""
    return _recipe("mobilenet:MobileNetV2", width=width, expansion=expansion,
                   input_shape=input_shape, num_classes=num_classes, seed=seed)


def transformer(*, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0,
                patch: int | None = None, pool: str = "cls",
                input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                seed: int = 0) -> ModelSpec:
    """A small Vision Transformer (:class:`~kdcompress.recipes.ViT`) recipe for images.

    Examples
    --------
    >>> model = transformer(dim=32, depth=2, input_shape=(1, 28, 28), num_classes=10).build()
    >>> model.patch, model(torch.zeros(2, 1, 28, 28)).shape
    (4, torch.Size([2, 10]))
    """
    check_vit(dim, heads, pool)
    return _recipe("vit:ViT", dim=dim, depth=depth, heads=heads, mlp_ratio=float(mlp_ratio),
                   patch=patch, pool=pool, input_shape=input_shape, num_classes=num_classes,
                   seed=seed)


def cnn1d(*, width: int = 64, hidden: int = 128, kernel: int = 5,
          input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
          seed: int = 0) -> ModelSpec:
    """A :class:`~kdcompress.recipes.CNN1d` recipe for sequence inputs ``(channels, length)``."""
    return _recipe("cnn1d:CNN1d", width=width, hidden=hidden, kernel=kernel,
                   input_shape=input_shape, num_classes=num_classes, seed=seed)


def _recipe(factory: str, *, input_shape: tuple[int, ...] | None, **kwargs: Any) -> ModelSpec:
    return ModelSpec(f"kdcompress.recipes.{factory}", {**kwargs,
                                                        "input_shape": _tuple(input_shape)})
