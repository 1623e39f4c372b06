"""Serve an exported classifier with ONNX Runtime: the wrapper a deployed model needs, no more.

:class:`OnnxClassifier` opens a ``.onnx`` file (fp32 or int8, from ``export_onnx`` or
``quantize_onnx``), checks inputs against the graph's declared input (name, shape, dtype) with
clear errors, runs them in batches, and returns class indices or probabilities as numpy arrays.
It uses the CUDA execution provider when onnxruntime-gpu and a GPU are present.

The wrapper is a convenience: the graph itself needs nothing from kdcompress at inference time
(see ``examples/deploy_onnxruntime.py`` for plain ONNX Runtime).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdcompress.errors import ArtifactError, InputError

__all__ = ["OnnxClassifier", "InputError", "default_providers", "provider_fallback"]

_NUMPY_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
}


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime-gpu is installed and sees a GPU, else CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and _has_gpu():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def provider_fallback(session: Any, asked: list[str], path: str | os.PathLike) -> str | None:
    """Why ``session`` does not run on the first provider ``asked`` for, or None when it does.

    ONNX Runtime falls down the provider list when one does not load (CUDA or cuDNN libraries
    missing) with only a log line; a caller that timed or served the session as the first
    provider's would be misled.
    """
    used = session.get_providers()
    if used[0] == asked[0]:
        return None
    return (f"{asked[0]} did not load for {Path(path).name}: the session runs on {used[0]} "
            "(check the libraries onnxruntime-gpu needs, e.g. CUDA and cuDNN)")


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # torch is optional at inference time
        return Path("/dev/nvidia0").exists()


class OnnxClassifier:
    """A classifier served from an ONNX graph with ONNX Runtime.

    Parameters
    ----------
    path : path
        The ``.onnx`` file (external data, if any, beside it).
    providers : list of str, optional
        ONNX Runtime execution providers; CUDA (when available) then CPU by default. A provider
        named here that does not load is an error; the default's CUDA provider that does not
        load is a ``RuntimeWarning`` (the session then runs on the CPU).
    threads : int, optional
        Intra-op threads; ONNX Runtime's default (all cores) when not given.

    Attributes
    ----------
    input_name : str
        The graph's input name.
    input_shape : tuple
        The graph's declared input shape; ``None`` for symbolic axes (the batch).
    providers : list of str
        The providers the session really uses.

    Examples
    --------
    >>> clf = OnnxClassifier("runs/tt_distill_quant/stages/int8/model.onnx")  # doctest: +SKIP
    >>> clf.predict(images)  # (N, 1, 8, 8) float32 -> (N,) int64  # doctest: +SKIP
    array([3, 1, 7, ...])
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"ONNX file {self.path} does not exist; pass the model.onnx "
                                "written by export_onnx or quantize_onnx")
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1 or None, but got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        asked = providers or default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=asked)
        except Exception as exc:  # ORT raises its own types for corrupt files and bad providers
            raise ArtifactError(f"ONNX Runtime cannot open {self.path}: {exc}") from exc
        message = provider_fallback(self.session, asked, self.path)
        if message:
            if providers:  # the caller asked for it by name
                raise ArtifactError(
                    f"{message}, or pass providers={self.session.get_providers()!r}")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ArtifactError(f"{self.path} has {len(inputs)} inputs "
                                f"({[i.name for i in inputs]}); OnnxClassifier serves graphs with "
                                "one input")
        self.input_name: str = inputs[0].name
        self.input_shape: tuple[int | None, ...] = tuple(
            d if isinstance(d, int) else None for d in inputs[0].shape)
        self._dtype = _NUMPY_DTYPES.get(inputs[0].type)
        if self._dtype is None:
            raise ArtifactError(f"{self.path} takes {inputs[0].type}; OnnxClassifier serves "
                                "graphs with a floating-point input")
        self.providers: list[str] = self.session.get_providers()

    def __repr__(self) -> str:
        shape = tuple("N" if d is None else d for d in self.input_shape)
        return f"OnnxClassifier('{self.path}', input {self.input_name}{shape}, {self.providers})"

    def logits(self, x: Any, *, batch_size: int = 256) -> np.ndarray:
        """Raw outputs (logits) of the graph, ``(N, num_classes)`` float32."""
        array = self._check(x)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
        outs = [self.session.run(None, {self.input_name: array[i:i + batch_size]})[0]
                for i in range(0, len(array), batch_size)]
        if not outs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)

    def predict_proba(self, x: Any, *, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (softmax of the logits), ``(N, num_classes)``."""
        z = self.logits(x, batch_size=batch_size)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x: Any, *, batch_size: int = 256) -> np.ndarray:
        """Predicted class indices, ``(N,)`` int64."""
        return self.logits(x, batch_size=batch_size).argmax(axis=1)

    def _check(self, x: Any) -> np.ndarray:
        """``x`` as a contiguous array of the graph's dtype, after checking its type and shape."""
        if type(x).__module__.startswith("torch"):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise InputError(f"expected a numpy array or a torch tensor, but got "
                             f"{type(x).__name__}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"expected floating-point input (the graph takes "
                             f"{np.dtype(self._dtype).name}), but got dtype {x.dtype}; "
                             "convert and normalise it as in training")
        expected = self.input_shape
        fits = x.ndim == len(expected) and all(
            e is None or e == s for e, s in zip(expected, x.shape, strict=True))
        if not fits:
            shape = tuple("N" if d is None else d for d in expected)
            hint = (" (one sample? add the batch axis: x[None])"
                    if x.ndim == len(expected) - 1 else "")
            raise InputError(f"input '{self.input_name}' must have shape {shape}, but got "
                             f"{tuple(x.shape)}{hint}")
        return np.ascontiguousarray(x, dtype=self._dtype)
