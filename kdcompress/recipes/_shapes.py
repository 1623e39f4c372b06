"""Shape checks shared by the recipes."""

from __future__ import annotations

from kdcompress.errors import PipelineError


def image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``input_shape``, or a :class:`PipelineError` naming the recipe to use."""
    if len(input_shape) != 3:
        hint = "models.cnn1d()" if len(input_shape) == 2 else "models.mlp()"
        raise PipelineError(f"{model} needs image inputs of shape (channels, height, width), but "
                            f"the data has shape {tuple(input_shape)}; use {hint}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def downsample(size: int) -> bool:
    """Whether a stage halves a spatial size: while it is above 7 (8 -> 4, 28 -> 14 -> 7)."""
    return size > 7
