"""kdcompress: compression pipelines for neural networks, measured after every stage.

>>> from kdcompress import Pipeline, data, models
>>> from kdcompress.stages import train, decompose_tt, distill, prune, export_onnx, quantize_onnx
"""

__version__ = "0.1.0"

from kdcompress import data, models  # noqa: E402
from kdcompress.artifacts import OnnxModel  # noqa: E402
from kdcompress.context import StageContext  # noqa: E402
from kdcompress.declare import stage  # noqa: E402
from kdcompress.errors import (  # noqa: E402
    KDCompressError,
    PipelineError,
    RunFailed,
    StageError,
)
from kdcompress.metrics import MeasureConfig  # noqa: E402
from kdcompress.options import RunOptions  # noqa: E402
from kdcompress.pipeline import Handle, Pipeline  # noqa: E402
from kdcompress.progress import NullProgress, Progress, RichProgress, StageFinished  # noqa: E402
from kdcompress.report import Report, StageRow, load_report  # noqa: E402

__all__ = ["Pipeline", "Handle", "OnnxModel", "StageContext", "RunOptions", "MeasureConfig",
           "Report", "StageRow", "load_report", "RunFailed", "Progress", "NullProgress",
           "RichProgress", "StageFinished", "stage", "data", "models", "KDCompressError",
           "PipelineError", "StageError", "__version__"]
