"""Random augmentation of training batches: the ``transforms=`` of ``train`` and ``distill``.

Each transform is a small frozen settings object; :func:`compose` turns a list of them into one
callable on a batch ``(B, C, H, W)`` that :func:`kdcompress.training.fit` applies to every
training batch, on the training device, after the batch is loaded and before the loss sees it.
Batches that are measured (validation, test, calibration) are never augmented, and when
distilling, the teacher and the student see the same augmented batch.

The spatial transforms are Kornia's batched augmentations (``kornia.augmentation``), which run
on the CPU or the GPU; random draws come from torch's global generator, which the stages seed
with the pipeline's seed, so a run repeats exactly. The settings, and Kornia's version, are part
of the stage's fingerprint.

>>> from kdcompress import augment
>>> compose([augment.RandomCrop(padding=2), augment.HorizontalFlip()])
RandomCrop(padding=2, padding_mode='replicate') + HorizontalFlip(p=0.5)
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdcompress.declare import Check
from kdcompress.errors import PipelineError, StageError

__all__ = ["Transform", "RandomCrop", "HorizontalFlip", "Translate", "Noise", "Augment",
           "Transforms", "compose", "TRANSFORMS"]

BatchFn = Callable[[Tensor], Tensor]
_PAD_MODES = ("replicate", "reflect", "constant")


class Transform:
    """A random augmentation of image batches; subclasses are frozen dataclasses of settings."""

    #: Whether the transform needs image batches ``(B, C, H, W)``.
    spatial: bool = True

    def batch_fn(self, shape: tuple[int, ...]) -> BatchFn:  # pragma: no cover - interface
        """The callable applying this transform to batches of inputs of ``shape``."""
        raise NotImplementedError

    def __kdc_fingerprint__(self) -> dict[str, Any]:
        return {"transform": type(self).__name__, **asdict(self),  # type: ignore[call-overload]
                "kornia": _kornia_version() if self.spatial else None}


def _kornia_version() -> str:
    try:
        return importlib.metadata.version("kornia")
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _kornia():
    try:
        import kornia.augmentation as K
    except ImportError as exc:
        raise StageError("spatial transforms need Kornia: pip install kornia") from exc
    return K


def _number(where: str, key: str, value: Any, *, low: float, high: float,
            low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        (low < value if low_open else low <= value) and value <= high)
    if not ok:
        rule = f"{low} {'<' if low_open else '<='} {key} <= {high}"
        raise PipelineError(f"{where}: {key} must satisfy {rule}, but got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RandomCrop(Transform):
    """Pad each image by ``padding`` pixels on every side, then crop a random window of the
    original size (the CIFAR recipe of He et al., "Deep Residual Learning", 2016).

    ``padding_mode``: ``"replicate"`` (the default) repeats the border pixels, which keeps a
    uniform background such as MNIST's exact; ``"reflect"`` mirrors the image; ``"constant"``
    pads with 0, which after normalisation is the data's mean, not black.
    """

    padding: int = 4
    padding_mode: str = "replicate"

    def __post_init__(self) -> None:
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) \
                or self.padding < 1:
            raise PipelineError(f"RandomCrop: padding must be an integer >= 1, but got "
                                f"{self.padding!r}")
        if self.padding_mode not in _PAD_MODES:
            raise PipelineError(f"RandomCrop: padding_mode must be one of "
                                f"{', '.join(map(repr, _PAD_MODES))}, but got "
                                f"{self.padding_mode!r}")

    def batch_fn(self, shape: tuple[int, ...]) -> BatchFn:
        return _kornia().RandomCrop(tuple(shape[-2:]), padding=self.padding,
                                    padding_mode=self.padding_mode, p=1.0)


@dataclass(frozen=True)
class HorizontalFlip(Transform):
    """Mirror each image left-right with probability ``p``."""

    p: float = 0.5

    def __post_init__(self) -> None:
        _number("HorizontalFlip", "p", self.p, low=0, high=1, low_open=True)

    def batch_fn(self, shape: tuple[int, ...]) -> BatchFn:
        return _kornia().RandomHorizontalFlip(p=self.p)


@dataclass(frozen=True)
class Translate(Transform):
    """Shift each image by up to ``fraction`` of its width and height (uniform, sub-pixel,
    bilinear), filling the uncovered border with the edge pixels."""

    fraction: float = 0.1

    def __post_init__(self) -> None:
        _number("Translate", "fraction", self.fraction, low=0, high=0.5, low_open=True)

    def batch_fn(self, shape: tuple[int, ...]) -> BatchFn:
        f = float(self.fraction)
        return _kornia().RandomAffine(degrees=0.0, translate=(f, f), padding_mode="border",
                                      p=1.0)


@dataclass(frozen=True)
class Noise(Transform):
    """Add Gaussian noise of standard deviation ``std`` (in the normalised input's units) to
    every input. Inputs of any shape: plain torch, since Kornia's noise takes images only."""

    std: float = 0.1
    spatial = False

    def __post_init__(self) -> None:
        _number("Noise", "std", self.std, low=0, high=float("inf"), low_open=True)

    def batch_fn(self, shape: tuple[int, ...]) -> BatchFn:
        std = float(self.std)
        return lambda x: x + std * torch.randn_like(x)


#: What ``transforms=`` takes: one transform or function of the batch, or a list of them.
Transforms = Transform | BatchFn | Sequence[Transform | BatchFn]


class Augment:
    """The transforms of one stage, applied in order to a batch; built for each input shape
    and device on first use. A plain function in the list is called as ``fn(batch)``."""

    def __init__(self, steps: Sequence[Transform | BatchFn]) -> None:
        self.steps = tuple(steps)
        self._built: dict[tuple, list[BatchFn]] = {}

    def check_input(self, input_shape: tuple[int, ...], stage: str) -> None:
        """A StageError, before any training, when a spatial transform meets non-image data."""
        for step in self.steps:
            if isinstance(step, Transform) and step.spatial and len(input_shape) != 3:
                raise StageError(f"stage '{stage}': transforms={self!r}: {type(step).__name__} "
                                 "needs image inputs of shape (channels, height, width), but "
                                 f"the data's inputs have shape {tuple(input_shape)}; use "
                                 "Noise(...) or a function of the batch")

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape[1:]), x.device)
        if key not in self._built:
            fns = [s.batch_fn(key[0]) if isinstance(s, Transform) else s for s in self.steps]
            self._built[key] = [f.to(x.device) if isinstance(f, nn.Module) else f for f in fns]
        for fn in self._built[key]:
            x = fn(x)
        return x

    def __repr__(self) -> str:
        return " + ".join(repr(s) if isinstance(s, Transform) else
                          getattr(s, "__qualname__", repr(s)) for s in self.steps)


def _items(transforms: Any) -> list[Any]:
    if transforms is None:
        return []
    return list(transforms) if isinstance(transforms, (list, tuple)) else [transforms]


def compose(transforms: Transforms | None) -> Augment | None:
    """One :class:`Augment` of ``transforms`` (one, a list, or ``None`` for no augmentation).

    Raises
    ------
    PipelineError
        An item is neither a :class:`Transform` nor a plain function (see :data:`TRANSFORMS`).
    """
    problem = TRANSFORMS("transforms", transforms)
    if problem:
        raise PipelineError(problem)
    items = _items(transforms)
    return Augment(items) if items else None


class _TransformsCheck(Check):
    """The declaration rule of ``transforms=``: transforms of this module or plain functions
    (whose source is fingerprinted), one or a list; a torch module is refused, since its
    settings cannot be fingerprinted for the cache."""

    def __call__(self, key: str, value: Any) -> str | None:
        for item in _items(value):
            if isinstance(item, Transform):
                continue
            if isinstance(item, nn.Module):
                return (f"{key}: {type(item).__name__} is a torch module, whose settings cannot "
                        "be fingerprinted for the cache; use kdcompress.augment's RandomCrop, "
                        "HorizontalFlip, Translate or Noise, or a function of the batch defined "
                        "in the pipeline file")
            if callable(item) and hasattr(item, "__qualname__"):
                continue
            return (f"{key} must be kdcompress.augment transforms (RandomCrop(padding=4), "
                    "HorizontalFlip(), Translate(0.1), Noise(0.1)), a function of the batch, or "
                    f"a list of them, but got {item!r}")
        return None


#: The rule ``train`` and ``distill`` declare for ``transforms=``.
TRANSFORMS = _TransformsCheck()
