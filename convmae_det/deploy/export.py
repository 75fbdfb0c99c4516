"""Export a detector or segmenter of this project to TorchScript or ONNX, as detectron2's
``tools/deploy/export_model.py`` does with its :class:`~detectron2.export.TracingAdapter`.

What the exported graph computes (input: one (3, H, W) float32 image, 0..255, in the model's
channel order, *after* the test resize; H and W any size the model accepts):

* Mask R-CNN (``GeneralizedRCNN``): ``model.inference(..., do_postprocess=False)``: pixel
  normalisation, padding to ``size_divisibility`` (and ``square_pad``), backbone, RPN, box and mask
  heads with their NMS; outputs ``pred_boxes`` (N, 4) in the resized image's pixels,
  ``pred_classes`` (N,), ``scores`` (N,) and ``pred_masks`` (N, 1, M, M) mask probabilities. The
  runner (:class:`~convmae_det.deploy.runner.ExportedPredictor`) rescales them to the original
  image and pastes the masks with detectron2's own ``detector_postprocess``.
* UperNet (``EncoderDecoderSegmentor``): one whole-image pass (normalise, pad, encode, decode,
  crop back) returning ``sem_seg`` (K, H, W) logits. The runner does the sliding window (if the
  config tests that way) and ``sem_seg_postprocess``.

Sizes stay dynamic in the graph: the size-dependent branches of the models are taken with tensor
sizes while tracing (:func:`~convmae_det.deploy.tracing.traceable_shapes`), and every export is
checked against eager PyTorch at the traced size and at a second size before it is kept.

The folder is written next to its destination under a temporary name and renamed into place
when complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .compare import Comparison, Tolerances, compare_predictions
from .manifest import (
    FORMATS,
    MANIFEST_NAME,
    MODEL_FILES,
    Manifest,
    file_entry,
    write_manifest,
)
from .tracing import onnx_adaptive_pooling, traceable_shapes

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportResult",
    "UnsupportedExportError",
    "check_exportable",
    "check_exportable_model",
    "export_from_config",
    "export_model",
    "synthetic_image",
]

DEFAULT_OPSET = 18
"""ONNX opset of the exports (the TorchScript-based ``torch.onnx`` exporter supports up to 20)."""

logger = logging.getLogger(__name__)

_DETECTOR = "instances"
_SEGMENTER = "sem_seg"


class UnsupportedExportError(ValueError):
    """A config option the export cannot reproduce; ``option`` names it."""

    def __init__(self, option: str, message: str):
        super().__init__(f"cannot export: {option}: {message}")
        self.option = option


class ExportError(RuntimeError):
    """The export itself failed (tracing, ONNX check, or the exported model differs from eager)."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how the exported model compared with eager PyTorch.

    Attributes:
        output: the exported folder.
        manifest: its manifest.
        checks: (image size, :class:`Comparison`) per verified size (empty with verify=False).
    """

    output: str
    manifest: Manifest
    checks: List[Tuple[Tuple[int, int], Comparison]] = field(default_factory=list)

    def lines(self) -> List[str]:
        """A human summary: the folder, the graph, and one line per verified size."""
        m = self.manifest
        out = [
            f"exported {m.task} model ({m.config_file}) as {m.format} to {self.output} "
            f"({m.files['model']['bytes'] / 2**20:.1f} MiB, traced at "
            f"{m.traced_size[0]}x{m.traced_size[1]})"
        ]
        for (h, w), comparison in self.checks:
            out.append(f"  check at {h}x{w} against eager PyTorch: {comparison.summary()}")
        return out


# ----------------------------------------------------------------------------- config checks
def _model_target(cfg: Any, kind: str) -> Tuple[Optional[type], str]:
    """The model's class (None when it is not a class) and its name as the config gives it."""
    if kind == "yacs":
        from detectron2.modeling import META_ARCH_REGISTRY

        name = str(cfg.MODEL.META_ARCHITECTURE)
        try:
            return META_ARCH_REGISTRY.get(name), name
        except KeyError:
            return None, name
    target = cfg.model.get("_target_") if hasattr(cfg, "model") else None
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        name, target = target, locate(target)
    else:
        name = getattr(target, "__qualname__", repr(target))
    return (target if isinstance(target, type) else None), name


def _task_of_class(klass: Optional[type]) -> Optional[str]:
    from detectron2.modeling import GeneralizedRCNN

    from ..modeling.segmentor import EncoderDecoderSegmentor

    if klass is not None and issubclass(klass, GeneralizedRCNN):
        return _DETECTOR
    if klass is not None and issubclass(klass, EncoderDecoderSegmentor):
        return _SEGMENTER
    return None


def check_exportable(cfg: Any, kind: str) -> str:
    """Refuse, before anything is built or written, a config the export cannot reproduce.

    Returns:
        the task, "instances" or "sem_seg".
    Raises:
        UnsupportedExportError: naming the option (``MODEL.META_ARCHITECTURE``, ``model``,
            ``model.proposal_generator``, ``TEST.SEM_SEG.SCALES``, ``TEST.SEM_SEG.FLIP``,
            ``dataloader.test.mapper.augmentations``, ``INPUT.FORMAT`` / ``model.input_format``).
    """
    from ..visualization.predictor import input_format, test_augmentations

    klass, name = _model_target(cfg, kind)
    task = _task_of_class(klass)
    supported = "Mask R-CNN (GeneralizedRCNN) detectors and EncoderDecoderSegmentor segmenters"
    if task is None:
        option = "MODEL.META_ARCHITECTURE" if kind == "yacs" else "model._target_"
        raise UnsupportedExportError(option, f"{name} is not exportable; supported: {supported}")
    if task == _DETECTOR and kind == "lazy" and cfg.model.get("proposal_generator") is None:
        raise UnsupportedExportError(
            "model.proposal_generator",
            "None (precomputed proposals) cannot be exported; the graph must make its proposals",
        )
    if task == _DETECTOR and kind == "yacs" and cfg.MODEL.LOAD_PROPOSALS:
        raise UnsupportedExportError(
            "MODEL.LOAD_PROPOSALS", "precomputed proposals cannot be exported"
        )
    if task == _SEGMENTER and kind == "yacs":
        test = cfg.TEST.SEM_SEG
        if tuple(test.SCALES) != (1.0,):
            raise UnsupportedExportError(
                "TEST.SEM_SEG.SCALES",
                f"{list(test.SCALES)}: multi-scale testing is not exported; set "
                "TEST.SEM_SEG.SCALES [1.0]",
            )
        if test.FLIP:
            raise UnsupportedExportError(
                "TEST.SEM_SEG.FLIP", "flip testing is not exported; set TEST.SEM_SEG.FLIP False"
            )
    fmt = input_format(cfg, kind)
    if fmt not in ("RGB", "BGR"):
        option = "INPUT.FORMAT" if kind == "yacs" else "model.input_format"
        raise UnsupportedExportError(option, f"{fmt!r}; the runner feeds 'RGB' or 'BGR' images")
    _resize_spec(test_augmentations(cfg, kind), kind)  # only resizes the runner can redo
    return task


def check_exportable_model(model: nn.Module, task: str) -> None:
    """Checks that need the built model (options a LazyConfig sets through its arguments).

    Raises:
        UnsupportedExportError: test-time scales / flip of a segmenter.
    """
    if task == _SEGMENTER:
        if tuple(model.scales) != (1.0,):
            raise UnsupportedExportError(
                "scales", f"{list(model.scales)}: multi-scale testing is not exported"
            )
        if model.flip:
            raise UnsupportedExportError("flip", "flip testing is not exported")


def _resize_spec(augs: Sequence[Any], kind: str) -> Optional[Dict[str, Any]]:
    """The test resize as manifest data (detectron2 ``ResizeShortestEdge`` arguments)."""
    from detectron2.data import transforms as T

    option = (
        "dataloader.test.mapper.augmentations"
        if kind == "lazy"
        else "INPUT.MIN_SIZE_TEST / TEST.SEM_SEG.MIN_SIZE"
    )
    if len(augs) > 1:
        raise UnsupportedExportError(option, f"{augs}: the runner redoes one resize at most")
    if not augs:
        return None
    aug = augs[0]
    if type(aug) is not T.ResizeShortestEdge:
        raise UnsupportedExportError(
            option, f"{type(aug).__name__}: only ResizeShortestEdge test resizes are exported"
        )
    return {
        "short_edge_length": [int(s) for s in aug.short_edge_length],
        "max_size": int(aug.max_size),
        "sample_style": str(aug.sample_style),
        "interp": int(aug.interp),
    }


# ----------------------------------------------------------------------------- what is traced
def detector_inference(model: nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The traced part of a Mask R-CNN: ``inference(do_postprocess=False)`` on one image, its
    ``Instances`` fields as a dict (``Boxes`` as their tensor)."""
    from detectron2.structures import Boxes

    instances = model.inference([{"image": image}], do_postprocess=False)[0]
    return {
        name: value.tensor if isinstance(value, Boxes) else value
        for name, value in instances.get_fields().items()
    }


def segmenter_inference(model: nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The traced part of a segmenter: the whole-image pass of its ``whole_inference`` (normalise,
    zero-pad to ``size_divisibility``, encode-decode, crop back); ``{"sem_seg": (K, H, W)}``."""
    x = ((image.to(model.device) - model.pixel_mean) / model.pixel_std)[None]
    h, w = x.shape[-2:]
    div = max(int(model.backbone.size_divisibility), 1)
    x = F.pad(x, (0, (-w) % div, 0, (-h) % div))  # a pad by 0 when already divisible
    return {"sem_seg": model._encode_decode(x)[0, :, :h, :w]}


_INFERENCE: Dict[str, Callable[[nn.Module, torch.Tensor], Dict[str, torch.Tensor]]] = {
    _DETECTOR: detector_inference,
    _SEGMENTER: segmenter_inference,
}


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 RGB image: smooth shapes on noise, so that a detector
    finds something to keep and a segmenter sees texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = rng.integers(0, 60, size=(height, width, 3)).astype(np.float32)
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.08, 0.3) * min(height, width)
        color = rng.uniform(80, 255, size=3)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[inside] = color
    return img.clip(0, 255).astype(np.uint8)


def _default_sample_size(resize: Optional[Dict[str, Any]]) -> Tuple[int, int]:
    """A sample image size the config's test resize keeps (4:3, landscape)."""
    if resize is None:
        return 192, 256
    short = max(resize["short_edge_length"])
    long = min(short * 4 // 3, resize["max_size"]) if resize["max_size"] > 0 else short * 4 // 3
    return short, long


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the tracer's warnings about the asserts and branches it freezes (the
    size-dependent ones are handled by :func:`traceable_shapes`; the others only check input)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


def _versions(fmt: str) -> Dict[str, str]:
    import detectron2

    from .. import __version__

    out = {
        "convmae_det": __version__,
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
    }
    if fmt == "onnx":
        import onnx

        out["onnx"] = onnx.__version__
    return out


# ----------------------------------------------------------------------------- export
def export_model(
    model: nn.Module,
    cfg: Any,
    kind: str,
    output: str,
    *,
    fmt: str = "onnx",
    sample_image: Optional[np.ndarray] = None,
    config_file: str = "",
    config_opts: Sequence[str] = (),
    weights: str = "",
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    tolerances: Optional[Tolerances] = None,
) -> ExportResult:
    """Trace ``model`` (built from ``cfg``, in eval mode, on the CPU) and write ``output``.

    Args:
        model: the detector or segmenter of ``cfg`` with its weights loaded.
        output: folder to create (replaced if it is an earlier export; an existing folder that
            is not an export is refused).
        fmt: "torchscript" or "onnx".
        sample_image: (H, W, 3) uint8 RGB traced through (default: :func:`synthetic_image`).
        config_file, config_opts, weights: recorded in the manifest (what the eager model of
            ``tools/export_model.py --benchmark`` is built from).
        opset: ONNX opset.
        verify: run the exported graph through :class:`ExportedPredictor` on the sample and on a
            narrower crop of it, compare with eager PyTorch, keep the folder only when they agree
            within ``tolerances``.
    Side effect: the model's ConvViT attention runs through SDPA afterwards (the path the
    predictor runs; same results as the explicit path to ~1e-6).
    Raises:
        UnsupportedExportError / ValueError: options or arguments the export cannot take.
        ExportError: tracing or the ONNX check failed, or the exported model does not match.
    """
    from detectron2.export import TracingAdapter

    from ..fast_paths import set_fused_attn
    from ..visualization.predictor import input_format, test_augmentations, test_metadata

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; expected one of {FORMATS}")
    task = check_exportable(cfg, kind)
    check_exportable_model(model, task)
    _check_output_folder(output)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ValueError("--format onnx needs the onnx package: pip install onnx") from None

    model.eval()
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"export runs on the CPU; the model is on {device}")
    set_fused_attn(model, True)  # SDPA: the predictor's path, and one op in TorchScript

    resize = _resize_spec(test_augmentations(cfg, kind), kind)
    fmt_in = input_format(cfg, kind)
    backbone = model.backbone
    divisibility = int(getattr(backbone, "size_divisibility", 0) or 1)
    square = int((getattr(backbone, "padding_constraints", None) or {}).get("square_size", 0) or 0)
    manifest_base = dict(
        task=task,
        config_kind=kind,
        config_file=config_file,
        config_opts=[str(o) for o in config_opts],
        weights=weights,
        input_format=fmt_in,
        size_divisibility=divisibility,
        square_size=square,
        min_image_side=_min_image_side(model, task, divisibility),
        test_resize=resize,
        class_names=_class_names(test_metadata(cfg, kind), task),
        num_classes=_num_classes(model, task),
        sem_seg=_sem_seg_spec(model) if task == _SEGMENTER else None,
    )

    from .runner import preprocess

    if sample_image is None:
        sample_image = synthetic_image(*_default_sample_size(resize))
    image, _ = preprocess(sample_image, "RGB", fmt_in, resize)
    adapter = TracingAdapter(model, image, _INFERENCE[task]).eval()
    with torch.no_grad():
        adapter(image)  # records the output schema (the field names, sorted)
    outputs = list(getattr(adapter.outputs_schema, "keys", None) or [])

    parent = os.path.dirname(os.path.abspath(output)) or "."
    created = _first_missing(parent)  # removed again if the export fails
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is a normal folder
        name = MODEL_FILES[fmt]
        path = os.path.join(tmp, name)
        try:
            with _quiet_tracing(), traceable_shapes():
                if fmt == "torchscript":
                    traced = torch.jit.trace(adapter, (image,), check_trace=False)
                    torch.jit.save(traced, path)
                else:
                    _export_onnx(model, adapter, image, path, outputs, opset)
        except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"tracing {config_file or 'the model'} to {fmt} failed: {first}")
        finally:
            model.eval()  # torch.onnx.export restores the adapter's (training) mode afterwards
        manifest = Manifest(
            format=fmt,
            inputs=["image"],
            outputs=outputs,
            traced_size=[int(image.shape[1]), int(image.shape[2])],
            files={"model": file_entry(tmp, name)},
            opset=opset if fmt == "onnx" else None,
            versions=_versions(fmt),
            **manifest_base,
        )
        write_manifest(tmp, manifest)
        result = ExportResult(output=output, manifest=manifest)
        if verify:
            result.checks = _verify(model, tmp, sample_image, fmt_in, tolerances or Tolerances())
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            _remove_empty_folders(created)
        raise
    return result


def _first_missing(folder: str) -> Optional[str]:
    """The outermost ancestor of ``folder`` (or itself) that does not exist yet, or None."""
    missing = None
    while not os.path.exists(folder):
        missing = folder
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    return missing


def _remove_empty_folders(top: str) -> None:
    """Remove ``top`` if it holds nothing but empty folders."""
    for root, dirs, files in os.walk(top, topdown=False):
        if files:
            return
        for d in dirs:
            if os.path.exists(os.path.join(root, d)):
                return
        os.rmdir(root)


def _export_onnx(
    model: nn.Module,
    adapter: nn.Module,
    image: torch.Tensor,
    path: str,
    outputs: List[str],
    opset: int,
) -> None:
    import onnx

    dynamic = {"image": {1: "height", 2: "width"}}
    for name in outputs:
        dynamic[name] = {0: "instances"} if name != "sem_seg" else {1: "height", 2: "width"}
    with onnx_adaptive_pooling(model):
        torch.onnx.export(
            adapter,
            (image,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"onnx.checker refused the exported graph: {first}") from None


def _verify(
    model: nn.Module, folder: str, sample: np.ndarray, fmt_in: str, tol: Tolerances
) -> List[Tuple[Tuple[int, int], Comparison]]:
    """Compare the exported folder with eager PyTorch on ``sample`` and on a 3/4-wide crop."""
    from .runner import ExportedPredictor, preprocess

    exported = ExportedPredictor(folder)
    resize = exported.manifest.test_resize
    narrow = np.ascontiguousarray(sample[:, : max(1, sample.shape[1] * 3 // 4)])
    checks = []
    for img in (sample, narrow):
        tensor, _ = preprocess(img, "RGB", fmt_in, resize)
        with torch.no_grad():
            eager = model([{"image": tensor, "height": img.shape[0], "width": img.shape[1]}])[0]
        comparison = compare_predictions(eager, exported(img))
        size = (int(tensor.shape[1]), int(tensor.shape[2]))
        if not comparison.ok(tol):
            raise ExportError(
                f"the exported model differs from eager PyTorch at {size[0]}x{size[1]}: "
                f"{comparison.summary()}"
            )
        checks.append((size, comparison))
    return checks


def _check_output_folder(output: str) -> None:
    """An existing ``output`` must be an earlier export or empty (nothing else is replaced)."""
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise ValueError(f"--output {output} is a file; expected a folder to create")
        entries = os.listdir(output)
        if entries and MANIFEST_NAME not in entries:
            raise ValueError(
                f"--output {output} exists and is not an exported model folder; choose another "
                "folder (nothing was written)"
            )


def _move_into_place(tmp: str, output: str) -> None:
    """Rename the complete ``tmp`` folder to ``output``; an earlier export there is replaced
    (moved aside first, deleted once the new one is in place)."""
    old = None
    if os.path.exists(output):
        old = tempfile.mkdtemp(
            prefix=f".{os.path.basename(os.path.abspath(output))}.old-",
            dir=os.path.dirname(os.path.abspath(output)),
        )
        os.rmdir(old)
        os.rename(output, old)
    try:
        os.rename(tmp, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _min_image_side(model: nn.Module, task: str, divisibility: int) -> int:
    """Smallest image side the model accepts after the test resize (0: any). The segmenter's
    3x3 stride-2 E4 convolution needs a padded side of at least 3 x stride(e3)."""
    backbone = model.backbone
    if task == _SEGMENTER and getattr(backbone, "e4_mode", "") == "conv":
        need = 3 * int(backbone.strides[2])
        div = max(divisibility, 1)
        return div * (-(-need // div) - 1) + 1
    return 0


def _sem_seg_spec(model: nn.Module) -> Dict[str, Any]:
    return {
        "mode": str(model.test_mode),
        "crop_size": [int(s) for s in model.crop_size],
        "stride": [int(s) for s in model.stride],
    }


def _class_names(metadata: Any, task: str) -> List[str]:
    key = "stuff_classes" if task == _SEGMENTER else "thing_classes"
    return [str(n) for n in (getattr(metadata, key, None) or [])]


def _num_classes(model: nn.Module, task: str) -> int:
    head = model.sem_seg_head if task == _SEGMENTER else model.roi_heads
    return int(head.num_classes)


def export_from_config(
    config_file: str,
    output: str,
    *,
    fmt: str = "onnx",
    weights: str = "",
    opts: Optional[Sequence[str]] = None,
    sample_image: Optional[np.ndarray] = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> ExportResult:
    """Load ``config_file`` (+ ``opts``), check it can be exported, build the model on the CPU,
    load ``weights`` (default: the config's ``train.init_checkpoint`` / ``MODEL.WEIGHTS``; none:
    random weights, logged) with :class:`~convmae_det.checkpoint.ConvMAECheckpointer`, and
    :func:`export_model` it. Every check on the inputs runs before anything is written.

    Raises:
        ConfigError, UnsupportedExportError, FileNotFoundError, ValueError: user mistakes.
        ExportError: the export failed.
    """
    import convmae_det.data  # noqa: F401  (dataset metadata: class names)

    from ..engine.preflight import check_output_dir, check_weights_file
    from ..model_from_config import build_model_from_config, load_any_config

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {', '.join(FORMATS)}")
    cfg, kind = load_any_config(config_file, opts)
    check_exportable(cfg, kind)
    if not weights:
        weights = cfg.train.get("init_checkpoint", "") if kind == "lazy" else cfg.MODEL.WEIGHTS
    weights = str(weights or "")
    check_weights_file("--weights", weights)
    check_output_dir("--output", output)
    _check_output_folder(output)
    model = build_model_from_config(cfg, kind, device="cpu").eval()
    if weights:
        from ..checkpoint import ConvMAECheckpointer

        ConvMAECheckpointer(model).load(weights)
    else:
        logger.warning("no weights given: exporting a randomly initialised model")
    return export_model(
        model,
        cfg,
        kind,
        output,
        fmt=fmt,
        sample_image=sample_image,
        config_file=config_file,
        config_opts=list(opts or []),
        weights=weights,
        opset=opset,
        verify=verify,
    )
