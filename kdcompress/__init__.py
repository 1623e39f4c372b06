"""kdcompress: compression pipelines for neural networks, measured after every stage.

>>> from kdcompress import Pipeline, data, models
>>> from kdcompress.stages import train, decompose_tt, distill, prune, export_onnx, quantize_onnx
"""

__version__ = "0.1.0"

from kdcompress import data, models  # noqa: E402
from kdcompress.artifacts import OnnxModel  # noqa: E402
from kdcompress.errors import KDCompressError, PipelineError, StageError  # noqa: E402
from kdcompress.pipeline import Handle, Pipeline  # noqa: E402

__all__ = ["Pipeline", "Handle", "OnnxModel", "data", "models", "KDCompressError",
           "PipelineError", "StageError", "__version__"]
