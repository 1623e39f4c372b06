"""Built-in stages, one module each. A stage is a plain function; see :class:`kdcompress.Pipeline`.

>>> from kdcompress.stages import train, decompose_tt, distill, prune, export_onnx, quantize_onnx
"""

from kdcompress.stages.decompose import decompose_tt
from kdcompress.stages.distill import distill
from kdcompress.stages.export import export_onnx
from kdcompress.stages.prune import prune
from kdcompress.stages.quantize import quantize_onnx
from kdcompress.stages.train import train

__all__ = ["train", "decompose_tt", "distill", "prune", "export_onnx", "quantize_onnx"]
