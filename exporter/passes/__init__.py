"""Graph passes on ``onnx_ir``: cleanup and fusions to ONNX Runtime contrib ops.

``fuse_model(model, options) -> FusionReport`` (counts per fusion) and
``fuse_onnx_file(path)``; see :mod:`.pipeline`. One fusion per module.
"""

from .pipeline import FusionOptions, FusionReport, fuse_model, fuse_onnx_file

__all__ = ["FusionOptions", "FusionReport", "fuse_model", "fuse_onnx_file"]
