"""Capture the outputs of named submodules with forward hooks, without editing the model.

Modules are named by their qualified names, as ``model.named_modules()`` lists them
(``"features.3"``, ``"classifier.fc1"``), the way torchdistill's ``forward_hook`` does.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> with FeatureCapture(model, ["1"]) as capture:
...     _ = model(torch.randn(3, 4))
>>> capture.features["1"].shape
torch.Size([3, 8])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from kdcompress.errors import LayerError, did_you_mean

__all__ = ["FeatureCapture", "find_module", "module_names"]


def module_names(model: nn.Module) -> list[str]:
    """The qualified names of every submodule of ``model`` (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def find_module(model: nn.Module, name: str, *, role: str = "model") -> nn.Module:
    """Return the submodule called ``name``; :class:`LayerError` with a suggestion if absent."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = module_names(model)
    shown = ", ".join(f"'{n}'" for n in names[:12]) + (", ..." if len(names) > 12 else "")
    raise LayerError(f"the {role} ({type(model).__name__}) has no submodule '{name}'."
                     f"{did_you_mean(name, names)} Its submodules are: {shown or 'none'}")


def _first_tensor(output: Any) -> Any:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return output


class FeatureCapture:
    """Record the output of each named submodule at every forward pass.

    Outputs that are tuples or lists (an LSTM's) are recorded as their first tensor. With
    ``clone=True`` (the default) the recorded tensor is a copy, so a following in-place
    operation (``nn.ReLU(inplace=True)``) can neither change it nor break its gradient.

    Parameters
    ----------
    model : nn.Module
        The model to observe; it is not modified apart from the hooks, removed by
        :meth:`remove` (or on leaving a ``with`` block).
    names : iterable of str
        Qualified submodule names.
    role : str
        How errors refer to the model (``"student"``, ``"teacher 0"``).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, role: str = "model",
                 clone: bool = True) -> None:
        self.names = list(dict.fromkeys(names))
        self.features: dict[str, Any] = {}
        self.clone = clone
        modules = [find_module(model, n, role=role) for n in self.names]
        self._handles = [m.register_forward_hook(self._hook(n))
                         for n, m in zip(self.names, modules, strict=True)]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = _first_tensor(output)
            self.features[name] = out.clone() if self.clone and isinstance(out, Tensor) else out
        return hook

    def pop(self) -> dict[str, Any]:
        """Return the features of the last forward pass and forget them."""
        features, self.features = self.features, {}
        return features

    def clear(self) -> None:
        """Forget the recorded features."""
        self.features = {}

    def remove(self) -> None:
        """Remove the hooks (the model is as it was); recorded features stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
