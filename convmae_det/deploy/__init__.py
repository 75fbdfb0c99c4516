"""Deployment: export the detectors and the segmenter to TorchScript / ONNX and run the exports.

    from convmae_det.deploy import export_from_config, ExportedPredictor
    export_from_config("configs/toy/mask_rcnn_convvitdet_toy.py", "out/det_onnx", fmt="onnx",
                       weights="model_final.pth")
    predictor = ExportedPredictor("out/det_onnx")
    outputs = predictor(rgb_image)      # {"instances": Instances}, as the eager Predictor

The exporter (:mod:`.export`) needs the model code; the runner (:mod:`.runner`) needs only the
folder, PyTorch / detectron2 structures and, for ONNX, onnxruntime. See docs/DEPLOYMENT.md.
"""

from .compare import Comparison, Tolerances, compare_predictions
from .export import (
    DEFAULT_OPSET,
    ExportError,
    ExportResult,
    UnsupportedExportError,
    check_exportable,
    export_from_config,
    export_model,
    synthetic_image,
)
from .manifest import EXPORT_FORMAT_VERSION, FORMATS, ExportedModelError, Manifest, read_manifest
from .runner import ExportedPredictor
from .tracing import traceable_shapes

__all__ = [
    "Comparison",
    "DEFAULT_OPSET",
    "EXPORT_FORMAT_VERSION",
    "ExportError",
    "ExportResult",
    "ExportedModelError",
    "ExportedPredictor",
    "FORMATS",
    "Manifest",
    "Tolerances",
    "UnsupportedExportError",
    "check_exportable",
    "compare_predictions",
    "export_from_config",
    "export_model",
    "read_manifest",
    "synthetic_image",
    "traceable_shapes",
]
