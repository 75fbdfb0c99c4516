"""Run an exported model folder (TorchScript or ONNX) on images, without the model code.

:class:`ExportedPredictor` reads the folder's ``manifest.json``, loads the graph (``torch.jit.load``
or an onnxruntime CPU session) and returns what the eager
:class:`~convmae_det.visualization.predictor.Predictor` returns for the same image:
``{"instances": Instances}`` (``pred_boxes``, ``scores``, ``pred_classes``, ``pred_masks`` pasted
at the image's size) or ``{"sem_seg": (K, H, W) scores}``.

The steps outside the graph are detectron2's own: the test ``ResizeShortestEdge``,
``detector_postprocess`` (box rescale, mask paste) and ``sem_seg_postprocess``; the sliding window
of segmenters runs here, one graph call per window. Nothing of ``convmae_det.modeling`` or the
configs is imported.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.sliding_window import sliding_window_boxes
from .manifest import ExportedModelError, Manifest, read_manifest

__all__ = ["ExportedPredictor", "ExportedModelError", "preprocess", "window_grid"]


def preprocess(
    image: np.ndarray,
    image_format: str,
    model_format: str,
    resize: Optional[Dict[str, Any]],
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """What the predictor feeds its model: channel order of the model, test resize, (3, H, W)
    float32. Returns (tensor, (H, W) after the resize)."""
    from detectron2.data import transforms as T

    if image_format != model_format:
        image = image[:, :, ::-1]
    aug = T.AugInput(np.ascontiguousarray(image))
    if resize is not None:
        T.AugmentationList(
            [
                T.ResizeShortestEdge(
                    tuple(resize["short_edge_length"]),
                    resize["max_size"],
                    sample_style=resize["sample_style"],
                    interp=resize["interp"],
                )
            ]
        )(aug)
    tensor = torch.as_tensor(aug.image.astype("float32").transpose(2, 0, 1))
    return tensor, (int(tensor.shape[1]), int(tensor.shape[2]))


def window_grid(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> List[Tuple[int, int, int, int]]:
    """Sliding windows ``(y1, y2, x1, x2)``: the eager segmenter's grid
    (:func:`convmae_det.utils.sliding_window.sliding_window_boxes`)."""
    return sliding_window_boxes(height, width, crop_size, stride)


class _TorchScriptGraph:
    def __init__(self, path: str):
        import torchvision  # noqa: F401  (registers torchvision::nms / roi_align for the graph)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                self.module = torch.jit.load(path, map_location="cpu").eval()
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ExportedModelError(f"{path}: not a loadable TorchScript file ({first})") from None

    def __call__(self, image: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            out = self.module(image)
        return list(out) if isinstance(out, (list, tuple)) else [out]


class _OnnxGraph:
    def __init__(self, path: str, num_threads: Optional[int]):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportedModelError(
                f"{path}: running ONNX exports needs onnxruntime (pip install onnxruntime)"
            ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0]
            raise ExportedModelError(f"{path}: onnxruntime cannot load it ({first})") from None

    def __call__(self, image: torch.Tensor) -> List[torch.Tensor]:
        outs = self.session.run(None, {"image": image.numpy()})
        return [torch.from_numpy(np.asarray(o)) for o in outs]


class ExportedPredictor:
    """Run a folder written by ``tools/export_model.py`` on single images.

    Args:
        folder: the exported folder (``manifest.json`` + the graph).
        num_threads: CPU threads of the onnxruntime session (default: ``torch.get_num_threads()``);
            TorchScript graphs use PyTorch's own setting.
    Attributes:
        manifest (:class:`~convmae_det.deploy.manifest.Manifest`), task, input_format,
        class_names, metadata.
    Raises:
        ExportedModelError: a missing folder or file, another export format version, a graph
            that cannot be loaded (one line).
    """

    def __init__(self, folder: str, *, num_threads: Optional[int] = None):
        self.folder = folder
        self.manifest: Manifest = read_manifest(folder)
        path = self.manifest.model_path(folder)
        if self.manifest.format == "torchscript":
            self._graph = _TorchScriptGraph(path)
        else:
            self._graph = _OnnxGraph(path, num_threads)

    # ------------------------------------------------------------------ description
    @property
    def task(self) -> str:
        """ "instances" (detector) or "sem_seg" (segmenter)."""
        return self.manifest.task

    @property
    def input_format(self) -> str:
        return self.manifest.input_format

    @property
    def class_names(self) -> List[str]:
        return list(self.manifest.class_names)

    def class_name(self, class_id: int) -> str:
        """The name of ``class_id`` (its number when the manifest has no names)."""
        names = self.manifest.class_names
        return names[class_id] if 0 <= class_id < len(names) else str(class_id)

    @property
    def metadata(self) -> Any:
        """A detectron2 ``Metadata`` with the class names (for ``Visualizer``)."""
        from detectron2.data.catalog import Metadata

        key = "stuff_classes" if self.task == "sem_seg" else "thing_classes"
        return Metadata(name=f"exported:{self.folder}", **{key: self.class_names})

    def describe_model(self, max_names: int = 12) -> List[str]:
        """``["model: 5 classes: circle, square, ..."]`` (as the eager predictor's)."""
        names = self.class_names
        if not names:
            return [f"model: {self.manifest.num_classes} classes, no class names: labels show ids"]
        shown = ", ".join(names[:max_names])
        if len(names) > max_names:
            shown += f", ... +{len(names) - max_names} more"
        return [f"model: {self.manifest.num_classes} classes: {shown}"]

    def describe_paths(self) -> str:
        """One line naming how inference runs."""
        m = self.manifest
        if m.format == "onnx":
            threads = self._graph.session.get_session_options().intra_op_num_threads
            return (
                f"inference: exported ONNX (opset {m.opset}) on onnxruntime, CPU, {threads} threads"
            )
        return f"inference: exported TorchScript, CPU, {torch.get_num_threads()} threads"

    def describe(self) -> str:
        """One line: format, task, config and size rules."""
        m = self.manifest
        sizes = (
            f"images up to {m.square_size}x{m.square_size} after the test resize"
            if m.square_size
            else "any image size"
        )
        return (
            f"exported {m.format} {m.task} model of {m.config_file or '?'} "
            f"({m.num_classes} classes, {m.input_format}, {sizes})"
        )

    # ------------------------------------------------------------------ inference
    def _check_size(self, h: int, w: int) -> None:
        m = self.manifest
        if m.square_size and (h > m.square_size or w > m.square_size):
            raise ValueError(
                f"image of {h}x{w} after the test resize: this export takes images up to "
                f"{m.square_size}x{m.square_size} (the model pads to that square)"
            )
        if m.min_image_side and min(h, w) < m.min_image_side:
            raise ValueError(
                f"image of {h}x{w} after the test resize: this export needs both sides >= "
                f"{m.min_image_side} px"
            )

    def _segment(self, tensor: torch.Tensor) -> torch.Tensor:
        spec = self.manifest.sem_seg or {"mode": "whole"}
        if spec["mode"] != "slide":
            return self._graph(tensor)[0]
        h, w = tensor.shape[-2:]
        logits = tensor.new_zeros((self.manifest.num_classes, h, w))
        count = tensor.new_zeros((1, h, w))
        for y1, y2, x1, x2 in window_grid(h, w, spec["crop_size"], spec["stride"]):
            crop = tensor[:, y1:y2, x1:x2].contiguous()
            logits[:, y1:y2, x1:x2] += self._graph(crop)[0]
            count[:, y1:y2, x1:x2] += 1
        return logits / count

    def __call__(self, image: np.ndarray, *, image_format: str = "RGB") -> Dict[str, Any]:
        """
        Args:
            image: (H, W, 3) uint8 in ``image_format`` ("RGB" or "BGR", e.g. from cv2).
        Returns:
            ``{"instances": Instances}`` at (H, W) for detectors, ``{"sem_seg": (K, H, W)}`` for
            segmenters, as :class:`~convmae_det.visualization.predictor.Predictor` returns.
        """
        from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
        from detectron2.structures import Boxes, Instances

        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format={image_format!r}; expected 'RGB' or 'BGR'")
        m = self.manifest
        height, width = image.shape[:2]
        tensor, (h, w) = preprocess(image, image_format, m.input_format, m.test_resize)
        self._check_size(h, w)
        if m.task == "sem_seg":
            return {"sem_seg": sem_seg_postprocess(self._segment(tensor), (h, w), height, width)}
        instances = Instances((h, w))
        for name, value in zip(m.outputs, self._graph(tensor)):
            instances.set(name, Boxes(value) if name == "pred_boxes" else value)
        return {"instances": detector_postprocess(instances, height, width)}
