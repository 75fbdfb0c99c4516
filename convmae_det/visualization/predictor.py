"""A predictor for both config kinds: LazyConfig ``.py`` and yacs ``.yaml``.

detectron2's ``DefaultPredictor`` only reads yacs configs; :class:`Predictor` takes either, builds
the model (random weights unless ``weights`` is given), applies the config's test-time resize and
the model's input format (RGB or BGR), and returns the model's output for one image at the image's
own size.

It also says what it shows: :attr:`Predictor.weights_report` tells how much of the model the
checkpoint filled (a typo'd weights key, no weights or a checkpoint of another model otherwise draw
a random model without a word), :meth:`Predictor.describe_model` names the classes the model knows.
A classifier (:class:`~convmae_det.modeling.classifier.ImageClassifier`) reads each image through
the config's test transform (``dataloader.test.mapper.transform``) and returns its class scores.

Inference runs with the fast paths that keep the numbers (:data:`INFERENCE_PATHS`: SDPA attention
and channels-last convolutions, fp32): same detections as the plain path (explicit attention,
NCHW; :data:`PLAIN_PATHS`), faster on CPU and GPU. ``dtype="bf16"`` runs under ``torch.autocast``
where the hardware has native bf16 (CPU: AVX512-BF16 or AMX; CUDA: compute capability >= 8.0) and
is refused with :class:`UnsupportedDtypeError` elsewhere; its detections are close to, not equal
to, the fp32 ones.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

from ..data.detection_mapper import UnreadableImageError, read_image_checked
from ..fast_paths import FastPaths, apply_fast_paths, autocast, fast_path_coverage
from ..model_from_config import build_model_from_config, load_any_config
from ..modeling.classifier import ImageClassifier

__all__ = [
    "INFERENCE_PATHS",
    "MOSTLY_RANDOM_FRACTION",
    "PLAIN_PATHS",
    "Predictor",
    "UnreadableImageError",
    "UnsupportedDtypeError",
    "WeightsReport",
    "bf16_support",
    "count_instances",
    "describe_paths",
    "input_format",
    "inference_paths",
    "model_num_classes",
    "read_input_image",
    "test_augmentations",
    "test_metadata",
    "unreadable_inputs_summary",
    "weights_report",
]

INFERENCE_PATHS = FastPaths(attn="sdpa", dtype="fp32", channels_last=True)
"""The predictor's default: SDPA attention and channels-last convolutions in fp32 (the same
detections as :data:`PLAIN_PATHS`; see ``tests/test_cpu_inference.py``)."""

PLAIN_PATHS = FastPaths(attn="explicit", dtype="fp32", channels_last=False)
"""The reference path: explicit softmax(QK^T + bias) V attention, NCHW convolutions."""

MOSTLY_RANDOM_FRACTION = 0.5
"""When at least this fraction of the model's parameters was not in the checkpoint (or no
checkpoint was given), the predictor's report warns that the pictures show a mostly random
model."""

logger = logging.getLogger(__name__)


def input_format(cfg: Any, kind: str) -> str:
    """ "RGB" or "BGR": the channel order the model of ``cfg`` expects."""
    if kind == "lazy":
        return str(cfg.model.get("input_format", "BGR"))
    return str(cfg.INPUT.FORMAT)


def read_input_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, EXIF orientation applied (detectron2's
    ``read_image``). Raises :class:`UnreadableImageError` naming the file and the cause
    (``reason``: "truncated", "not an image", "missing", ...)."""
    return read_image_checked(path, "RGB")


def unreadable_inputs_summary(skipped: Sequence[Tuple[str, str]], total: int) -> str:
    """``"2 of 7 inputs could not be read: a.jpg (truncated), b.txt (not an image)"`` for the
    (path, reason) of the skipped inputs out of ``total``."""
    listed = ", ".join(f"{path} ({reason})" for path, reason in skipped)
    return f"{len(skipped)} of {total} inputs could not be read: {listed}"


def _is_semantic_yacs(cfg: Any) -> bool:
    return "Semantic" in cfg.MODEL.META_ARCHITECTURE or "Seg" in cfg.MODEL.META_ARCHITECTURE


def test_augmentations(cfg: Any, kind: str) -> List[T.Augmentation]:
    """The test-time resize of a config: LazyConfig ``dataloader.test.mapper.augmentations``;
    yacs ``TEST.SEM_SEG.MIN_SIZE/MAX_SIZE`` for segmenters, ``INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST``
    otherwise (no resize when the min size is 0)."""
    if kind == "lazy":
        from detectron2.config import instantiate

        try:
            augs = cfg.dataloader.test.mapper.augmentations
        except (AttributeError, KeyError):
            return []
        return list(instantiate(augs) or [])
    if _is_semantic_yacs(cfg) and "SEM_SEG" in cfg.TEST:
        t = cfg.TEST.SEM_SEG
        return [T.ResizeShortestEdge(t.MIN_SIZE, t.MAX_SIZE)] if t.MIN_SIZE > 0 else []
    size = cfg.INPUT.MIN_SIZE_TEST
    return [T.ResizeShortestEdge(size, cfg.INPUT.MAX_SIZE_TEST)] if size > 0 else []


def test_metadata(cfg: Any, kind: str):
    """Metadata of the config's (first) test dataset, or an empty one."""
    name = None
    try:
        if kind == "lazy":
            names = cfg.dataloader.test.dataset.names
            name = names if isinstance(names, str) else list(names)[0]
        elif len(cfg.DATASETS.TEST):
            name = cfg.DATASETS.TEST[0]
    except (AttributeError, KeyError):
        name = None
    return MetadataCatalog.get(name or "__unused")


def classification_transform(cfg: Any) -> Callable:
    """The test transform of a classification LazyConfig (``dataloader.test.mapper.transform``:
    PIL image -> normalised (3, H, W) tensor)."""
    from detectron2.config import instantiate

    try:
        node = cfg.dataloader.test.mapper.transform
    except (AttributeError, KeyError):
        raise ValueError(
            "a classifier config needs dataloader.test.mapper.transform (the test transform)"
        ) from None
    return instantiate(node)


class UnsupportedDtypeError(ValueError):
    """``dtype`` asked for on a device without native support for it (the message says why)."""


def bf16_support(device: str = "cpu") -> Tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and what provides it (or why not).

    CPU: AMX tiles or AVX512-BF16 (PyTorch's own ``torch.cpu._is_amx_tile_supported`` /
    ``_is_avx512_bf16_supported``); without them bf16 matmuls are emulated and slower than fp32.
    CUDA: ``torch.cuda.is_bf16_supported()`` (compute capability 8.0 or newer)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA {torch.cuda.get_device_name()}"
        return False, "this GPU has no native bf16 (needs compute capability 8.0 or newer)"
    if kind != "cpu":
        return False, f"bf16 inference is only offered on the CPU and CUDA, not {kind!r}"
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return True, "AMX"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True, "AVX512-BF16"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return False, (
        f"this CPU has neither AVX512-BF16 nor AMX (PyTorch CPU capability: {capability}), so "
        "bf16 would be emulated and slower than fp32; use --dtype fp32"
    )


def inference_paths(dtype: str = "fp32", *, device: str = "cpu", plain: bool = False) -> FastPaths:
    """The paths :class:`Predictor` runs with: :data:`INFERENCE_PATHS` (or :data:`PLAIN_PATHS`
    with ``plain``) in ``dtype`` ("fp32" or "bf16"). Raises :class:`UnsupportedDtypeError` for
    bf16 on a device without native bf16, and for any other dtype."""
    if dtype not in ("fp32", "bf16"):
        raise UnsupportedDtypeError(f"dtype {dtype!r}: inference runs in 'fp32' or 'bf16'")
    if dtype == "bf16":
        ok, why = bf16_support(device)
        if not ok:
            raise UnsupportedDtypeError(f"--dtype bf16 refused on {device}: {why}")
    return replace(PLAIN_PATHS if plain else INFERENCE_PATHS, dtype=dtype)


def describe_paths(paths: FastPaths, device: str, coverage: Optional[Dict[str, int]] = None) -> str:
    """One line naming the inference paths, e.g. ``"inference: cpu fp32, SDPA attention (11 of 11
    modules SDPA), channels-last convolutions; same results as the plain path (to float
    rounding)"``."""
    parts = [f"inference: {torch.device(device).type} {paths.dtype}"]
    if paths.dtype == "bf16":
        parts[0] += f" autocast ({bf16_support(device)[1]})"
    n_attn = (coverage or {}).get("attention_modules", 0)
    n_sdpa = (coverage or {}).get("sdpa_attention_modules", 0)
    if n_attn:
        kind = "SDPA" if n_sdpa == n_attn else "explicit" if n_sdpa == 0 else "mixed"
        parts.append(f"{kind} attention ({n_sdpa} of {n_attn} modules SDPA)")
    parts.append("channels-last convolutions" if paths.channels_last else "NCHW convolutions")
    if paths == PLAIN_PATHS:
        tail = "the plain reference path"
    elif paths.dtype == "fp32":
        tail = "same results as the plain path (to float rounding)"
    else:
        tail = "results close to, not equal to, fp32"
    return ", ".join(parts) + "; " + tail


@dataclass
class WeightsReport:
    """How much of a model a checkpoint filled.

    Attributes:
        source: the checkpoint path ("" when none was given).
        report: the loader's :class:`~convmae_det.checkpoint.CheckpointReport` (None without
            weights).
        total_params: parameters (elements) of the model.
        loaded_params: parameters (elements) taken from the checkpoint.
        random_parts: {top-level module: parameters not loaded}, largest first.
    """

    source: str
    report: Any
    total_params: int
    loaded_params: int
    random_parts: Dict[str, int] = field(default_factory=dict)

    @property
    def random_fraction(self) -> float:
        """Fraction of the model's parameters not in the checkpoint (1.0 without weights)."""
        return 1.0 - self.loaded_params / max(self.total_params, 1)

    @property
    def mostly_random(self) -> bool:
        return self.random_fraction >= MOSTLY_RANDOM_FRACTION

    def lines(self) -> List[str]:
        """The report to print: one line when every parameter was loaded, else that line and a
        ``WARNING: ...`` line (a mostly random model, or which parts are random)."""
        if not self.source:
            return [
                "WARNING: no weights given (--weights, or train.init_checkpoint / MODEL.WEIGHTS "
                "of the config, is empty): the pictures show a randomly initialised model"
            ]
        r = self.report
        head = (
            f"weights: {self.source} (format: {r.format}): {len(r.loaded)} tensors loaded, "
            f"{_percent(1.0 - self.random_fraction)} of the model's parameters"
        )
        unused = len(r.unexpected) + len(r.mismatched)
        if unused:
            head += (
                f"; {len(r.unexpected)} checkpoint keys unused, {len(r.mismatched)} with another "
                "shape"
            )
        out = [head]
        if self.loaded_params < self.total_params:
            parts = ", ".join(
                f"{name} {_percent(n / self.total_params)}"
                for name, n in list(self.random_parts.items())[:4]
            )
            verdict = (
                "the pictures show a mostly random model"
                if self.mostly_random
                else "those parts are random"
            )
            out.append(
                f"WARNING: {_percent(self.random_fraction)} of the model's parameters were not in "
                f"{self.source}: {verdict} (not loaded: {parts})"
            )
        return out


def _percent(fraction: float) -> str:
    if 0.0 < fraction < 0.01:
        return "<1%"
    if 0.99 < fraction < 1.0:
        return ">99%"
    return f"{100.0 * fraction:.0f}%"


def weights_report(model: nn.Module, source: str = "", report: Any = None) -> WeightsReport:
    """A :class:`WeightsReport` of ``model`` after loading ``source`` (``report``: what
    :class:`~convmae_det.checkpoint.ConvMAECheckpointer` left in ``last_report``)."""
    loaded = set(report.loaded) if report is not None else set()
    total = done = 0
    missing: Counter = Counter()
    for name, p in model.named_parameters():
        total += p.numel()
        if name in loaded:
            done += p.numel()
        else:
            missing[name.split(".", 1)[0]] += p.numel()
    return WeightsReport(source, report, total, done, dict(missing.most_common()))


def model_num_classes(model: nn.Module) -> Optional[int]:
    """Classes a detector (``roi_heads.num_classes``), segmenter (``sem_seg_head.num_classes``)
    or classifier (``net.num_classes``) predicts; None when none is there."""
    for head in ("roi_heads", "sem_seg_head", "net"):
        n = getattr(getattr(model, head, None), "num_classes", None)
        if n is not None:
            return int(n)
    return None


def count_instances(output: Dict[str, Any], threshold: float) -> Counter:
    """{class id: instances with score >= ``threshold``} of a detector's output, {class id:
    pixels} of a segmenter's (argmax of ``sem_seg``), {predicted class: 1} of a classifier's."""
    if "instances" in output:
        inst = output["instances"].to("cpu")
        keep = inst.scores >= threshold if inst.has("scores") else slice(None)
        classes = inst.pred_classes[keep] if inst.has("pred_classes") else []
        return Counter(int(c) for c in classes)
    if "pred_class" in output:
        return Counter({int(output["pred_class"]): 1})
    if "sem_seg" in output:
        ids, counts = output["sem_seg"].argmax(0).cpu().unique(return_counts=True)
        return Counter({int(i): int(n) for i, n in zip(ids, counts)})
    return Counter()


class Predictor:
    """Run a detector or segmenter of either config kind on single images.

    Args:
        config_file: LazyConfig ``.py`` or yacs ``.yaml``.
        opts: overrides (``key=value`` for LazyConfig; ``KEY VALUE`` pairs for yacs); unknown
            keys and values of the wrong type raise ``ConfigError``.
        weights: checkpoint read with :class:`ConvMAECheckpointer` (any supported format); ""
            keeps the config's own ``train.init_checkpoint`` / ``MODEL.WEIGHTS`` if set.
        device: "cpu", "cuda", ...; default: CUDA when available.
        dtype: "fp32" or "bf16" (autocast; refused with :class:`UnsupportedDtypeError` where the
            device has no native bf16).
        paths: the fast paths to run with; default :data:`INFERENCE_PATHS` in ``dtype``
            (:data:`PLAIN_PATHS` for the reference path).
    Attributes:
        cfg, kind ("lazy" | "yacs"), model, metadata, input_format, augmentations, paths,
        weights, weights_report (:class:`WeightsReport`).
    Raises:
        FileNotFoundError: a local ``weights`` file that does not exist.
    """

    def __init__(
        self,
        *,
        config_file: str = "",
        opts: Optional[List[str]] = None,
        weights: str = "",
        device: Optional[str] = None,
        cfg: Any = None,
        kind: Optional[str] = None,
        dtype: str = "fp32",
        paths: Optional[FastPaths] = None,
    ):
        import convmae_det.data  # noqa: F401  (dataset registration / metadata)

        if cfg is None:
            cfg, kind = load_any_config(config_file, opts)
        elif kind is None:
            raise ValueError("Predictor(cfg=...) also needs kind='lazy' or 'yacs'")
        self.cfg, self.kind = cfg, kind
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.paths = paths if paths is not None else inference_paths(dtype, device=self.device)
        if not weights:
            weights = cfg.train.get("init_checkpoint", "") if kind == "lazy" else cfg.MODEL.WEIGHTS
        weights = str(weights or "")
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"weights: no such checkpoint file: {weights}")
        self.model = build_model_from_config(cfg, kind, device=self.device).eval()
        report = None
        if weights:
            from ..checkpoint import ConvMAECheckpointer

            checkpointer = ConvMAECheckpointer(self.model)
            checkpointer.load(weights)
            report = checkpointer.last_report
        self.weights = weights
        self.weights_report = weights_report(self.model, weights, report)
        apply_fast_paths(self.model, self.paths, device=self.device, training=False)
        self.metadata = test_metadata(cfg, kind)
        self.input_format = input_format(cfg, kind)
        self.augmentations = T.AugmentationList(test_augmentations(cfg, kind))
        self.transform = classification_transform(cfg) if self.task == "classification" else None

    @torch.no_grad()
    def __call__(self, image: np.ndarray, *, image_format: str = "RGB") -> Dict[str, Any]:
        """
        Args:
            image: (H, W, 3) uint8 in ``image_format`` ("RGB" or "BGR", e.g. from cv2).
        Returns:
            the model's output for this image at (H, W): ``{"instances": Instances}`` for
            detectors, ``{"sem_seg": (K, H, W) scores}`` for segmenters (floating-point fields in
            fp32 also under bf16).
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format={image_format!r}; expected 'RGB' or 'BGR'")
        if self.transform is not None:  # a classifier: the config's test transform
            rgb = image if image_format == "RGB" else image[:, :, ::-1]
            tensor = self.transform(Image.fromarray(np.ascontiguousarray(rgb)))
            with autocast(self.device, self.paths.dtype):
                output = self.model([{"image": tensor.to(self.device)}])[0]
            return _to_fp32(output)
        if image_format != self.input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        aug = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug)
        tensor = torch.as_tensor(aug.image.astype("float32").transpose(2, 0, 1))
        inputs = {"image": tensor.to(self.device), "height": height, "width": width}
        with autocast(self.device, self.paths.dtype):
            output = self.model([inputs])[0]
        return _to_fp32(output) if self.paths.dtype != "fp32" else output

    @property
    def task(self) -> str:
        """ "sem_seg" for semantic segmenters, "classification" for classifiers, "instances"
        otherwise."""
        if isinstance(self.model, ImageClassifier):
            return "classification"
        if self.kind == "yacs":
            return "sem_seg" if _is_semantic_yacs(self.cfg) else "instances"
        return "sem_seg" if hasattr(self.model, "sem_seg_head") else "instances"

    @property
    def class_names(self) -> List[str]:
        """The class names of the test dataset's metadata (``thing_classes`` for detectors,
        ``stuff_classes`` for segmenters, ``classes`` for classifiers); [] when none are
        registered."""
        key = {"sem_seg": "stuff_classes", "classification": "classes"}.get(
            self.task, "thing_classes"
        )
        return list(getattr(self.metadata, key, None) or [])

    def describe_model(self, max_names: int = 12) -> List[str]:
        """What the model knows: ``"model: 5 classes of toy_coco_val: circle, ..."``, plus a
        ``WARNING`` line when the metadata names another number of classes than the model
        predicts (labels then show class ids)."""
        n = model_num_classes(self.model)
        names = self.class_names
        meta = self.metadata.name
        count = f"{n} classes" if n is not None else "classes"
        if not names:
            return [
                f"model: {count}, no class names (no registered test dataset metadata; "
                f"'{meta}'): labels show class ids"
            ]
        shown = ", ".join(names[:max_names]) + (
            f", ... +{len(names) - max_names} more" if len(names) > max_names else ""
        )
        out = [f"model: {count} of {meta}: {shown}"]
        if n is not None and n != len(names):
            out.append(
                f"WARNING: the model predicts {n} classes but {meta} names {len(names)}: "
                "labels of the others show class ids"
            )
        return out

    def describe_paths(self) -> str:
        """One line naming the inference paths in use (see :func:`describe_paths`)."""
        return describe_paths(self.paths, self.device, fast_path_coverage(self.model))

    def class_name(self, class_id: int) -> str:
        """The name of ``class_id`` (its number when the metadata has none)."""
        names = self.class_names
        return names[class_id] if 0 <= class_id < len(names) else str(class_id)


def _to_fp32(output: Dict[str, Any]) -> Dict[str, Any]:
    """Floating-point tensors of a model output (``Instances`` fields included) as fp32."""

    def conv(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.float()
        if hasattr(v, "tensor") and isinstance(v.tensor, torch.Tensor):  # Boxes
            if v.tensor.is_floating_point():
                v.tensor = v.tensor.float()
        return v

    out = {}
    for key, value in output.items():
        if hasattr(value, "get_fields"):
            for name, field_value in list(value.get_fields().items()):
                value.set(name, conv(field_value))
        else:
            value = conv(value)
        out[key] = value
    return out
