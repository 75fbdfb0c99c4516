"""yacs config keys of convmae_det (``add_convmae_config``), and the one safe way to read config
files (:func:`merge_config_file_safely` for yacs, :func:`load_lazy_config_safely` for LazyConfig).

Defaults reproduce the official ConvMAE-Base UperNet segmenter on ADE20K at 512x512; the config
files under ``configs/ADE20K/`` set the rest (datasets, schedule). Calling
:func:`add_convmae_config` also registers our backbone, heads and meta-architecture, so
``build_model(cfg)`` works right after it.

Config files never run code. detectron2's ``CfgNode.merge_from_file`` defaults to
``allow_unsafe=True`` (fvcore then retries a YAML tag it does not know with ``yaml.unsafe_load``)
and ``LazyConfig.load`` reads a ``.yaml`` with ``yaml.unsafe_load``, so a tag such as
``!!python/object/apply:os.system`` in a config, in a ``_BASE_`` it names or in a shared
``output/config.yaml`` would run. Every config load of the project goes through the two functions
here instead; a refused file gives :class:`UnsafeConfigError`, one line naming the file and the tag.
A LazyConfig ``.py`` is Python code by design: read one before running it.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from typing import Any, Dict, Optional, Set

import torch
import yaml
from detectron2.config import CfgNode as CN

__all__ = [
    "ConfigError",
    "UnsafeConfigError",
    "YAML_CALLABLE_MODULES",
    "add_convmae_config",
    "load_lazy_config_safely",
    "merge_config_file_safely",
]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which and why."""


class UnsafeConfigError(ConfigError):
    """A config file refused because a part of it would run code when loaded or instantiated."""


def add_convmae_config(cfg: CN) -> CN:
    """Add every convmae_det key to a detectron2 config (in place; also returned)."""
    from .modeling import segmentor, seg_backbone, upernet  # noqa: F401  (registries)

    _c = cfg

    # detectron2 defaults to "cuda"; on a machine without CUDA the model is built on the CPU.
    if _c.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        _c.MODEL.DEVICE = "cpu"

    # ---------------------------------------------------------------- ConvViT segmentation backbone
    _c.MODEL.CONVVIT = CN()
    # Stride of each stage's patch embedding (conv kernel = stride); cumulative 4, 8, 16.
    _c.MODEL.CONVVIT.PATCH_SIZES = [4, 2, 2]
    # Channels of stages 1-3 (ConvMAE-Base: 256, 384, 768).
    _c.MODEL.CONVVIT.EMBED_DIMS = [256, 384, 768]
    # Blocks per stage (Base: 2 conv, 2 conv, 11 transformer).
    _c.MODEL.CONVVIT.DEPTHS = [2, 2, 11]
    # Attention heads of the stage-3 blocks.
    _c.MODEL.CONVVIT.NUM_HEADS = 12
    # MLP expansion ratio per stage.
    _c.MODEL.CONVVIT.MLP_RATIOS = [4.0, 4.0, 4.0]
    # Bias in the qkv projection (True in the official segmenter).
    _c.MODEL.CONVVIT.QKV_BIAS = True
    # Stochastic depth, linearly increasing over all 15 blocks (0.2 in the ADE20K recipe).
    _c.MODEL.CONVVIT.DROP_PATH_RATE = 0.2
    # LayerNorm eps of the conv blocks, the stage-3 blocks and the patch embeddings
    # (the official segmenter uses PyTorch's default 1e-5 everywhere).
    _c.MODEL.CONVVIT.CONV_NORM_EPS = 1e-5
    _c.MODEL.CONVVIT.ATTN_NORM_EPS = 1e-5
    _c.MODEL.CONVVIT.PATCH_NORM_EPS = 1e-5
    # Grid of the stored pos_embed table: the fine-tuning grid (crop / 16, 32x32 at 512). A 14x14
    # pretraining table is resized bicubically at load; other grids are resized on the fly.
    _c.MODEL.CONVVIT.POS_EMBED_HW = [32, 32]
    # Relative positions: "per_block" (a BEiT table in each block, official), "none", "shared",
    # "decomposed".
    _c.MODEL.CONVVIT.REL_POS = "per_block"
    # Grid the relative tables are built for; empty = POS_EMBED_HW.
    _c.MODEL.CONVVIT.REL_POS_HW = []
    # Layer scale gamma_1/gamma_2 init value; 0 disables layer scale.
    _c.MODEL.CONVVIT.LAYER_SCALE_INIT = 1.0
    # Level E4 (stride 32): "conv" (official 3x3 stride-2 conv without padding + norm + GELU) or
    # "maxpool" (2x2 max-pool of E3).
    _c.MODEL.CONVVIT.E4_MODE = "conv"
    # Norm of the E4 conv ("SyncBN" official; becomes the gloo-capable naiveSyncBN on the CPU).
    _c.MODEL.CONVVIT.E4_NORM = "SyncBN"
    # Backbone outputs (strides 4, 8, 16, 32).
    _c.MODEL.CONVVIT.OUT_FEATURES = ["e1", "e2", "e3", "e4"]
    # Attention kernel: False = explicit softmax((q * scale) k^T + bias) v, the official op order
    # (bit-identical stage-3 outputs); True = F.scaled_dot_product_attention (faster, less memory,
    # equal up to float rounding, about 1e-6 relative).
    _c.MODEL.CONVVIT.FUSED_ATTN = False
    # Recompute stage-3 blocks in backward to save memory.
    _c.MODEL.CONVVIT.USE_ACT_CHECKPOINT = False

    # ---------------------------------------------------------------- UperNet decode head
    # (NAME, IN_FEATURES, NUM_CLASSES, IGNORE_VALUE, CONVS_DIM, NORM, LOSS_WEIGHT are detectron2's
    # own MODEL.SEM_SEG_HEAD keys; the config files set them for UperNet.)
    # Output sizes of the pyramid pooling module on the coarsest level.
    _c.MODEL.SEM_SEG_HEAD.POOL_SCALES = [1, 2, 3, 6]
    # Dropout2d before the classifier.
    _c.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1

    # ---------------------------------------------------------------- auxiliary FCN head
    _c.MODEL.AUX_HEAD = CN()
    # Add the auxiliary head's loss in training (it is not used in inference).
    _c.MODEL.AUX_HEAD.ENABLED = True
    # Registered head class (SEM_SEG_HEADS_REGISTRY).
    _c.MODEL.AUX_HEAD.NAME = "FCNHead"
    # Backbone level it reads (E3, stride 16).
    _c.MODEL.AUX_HEAD.IN_FEATURE = "e3"
    # Conv width, number of 3x3 convs, and whether to concatenate the input before the classifier.
    _c.MODEL.AUX_HEAD.CHANNELS = 256
    _c.MODEL.AUX_HEAD.NUM_CONVS = 1
    _c.MODEL.AUX_HEAD.CONCAT_INPUT = False
    # Norm of its convs ("BN", "SyncBN", "GN").
    _c.MODEL.AUX_HEAD.NORM = "SyncBN"
    # Dropout2d before its classifier.
    _c.MODEL.AUX_HEAD.DROPOUT = 0.1
    # Weight of its cross-entropy loss.
    _c.MODEL.AUX_HEAD.LOSS_WEIGHT = 0.4

    # ---------------------------------------------------------------- segmentation inference
    _c.TEST.SEM_SEG = CN()
    # "slide" (windows of CROP_SIZE every STRIDE, overlapping logits averaged) or "whole".
    _c.TEST.SEM_SEG.MODE = "slide"
    # Sliding window (h, w) and step (h, w).
    _c.TEST.SEM_SEG.CROP_SIZE = [512, 512]
    _c.TEST.SEM_SEG.STRIDE = [341, 341]
    # Resize ratios for multi-scale testing ([1.0]: single scale), e.g. [0.5, 0.75, ..., 1.75].
    _c.TEST.SEM_SEG.SCALES = [1.0]
    # Also average the prediction of the horizontally flipped image.
    _c.TEST.SEM_SEG.FLIP = False
    # Test-time resize: shortest edge and the cap on the longest (mmseg scale (2048, 512)).
    _c.TEST.SEM_SEG.MIN_SIZE = 512
    _c.TEST.SEM_SEG.MAX_SIZE = 2048

    # ---------------------------------------------------------------- segmentation training input
    _c.INPUT.SEM_SEG = CN()
    # Base (long, short) scale multiplied by a random ratio in RATIO_RANGE, aspect kept.
    _c.INPUT.SEM_SEG.SCALE = [2048, 512]
    _c.INPUT.SEM_SEG.RATIO_RANGE = [0.5, 2.0]
    # Square random crop; a crop may not be covered more than CAT_MAX_RATIO by one class.
    _c.INPUT.SEM_SEG.CROP_SIZE = 512
    _c.INPUT.SEM_SEG.CAT_MAX_RATIO = 0.75
    # Horizontal flip probability.
    _c.INPUT.SEM_SEG.FLIP_PROB = 0.5
    # mmseg PhotoMetricDistortion (brightness, contrast, saturation, hue).
    _c.INPUT.SEM_SEG.PHOTOMETRIC = True
    # Check every label map for values outside [0, NUM_CLASSES) other than IGNORE_VALUE.
    _c.INPUT.SEM_SEG.CHECK_LABELS = True

    # ---------------------------------------------------------------- solver
    # "AdamW" (layer-wise lr decay, no decay on norms / biases / position tables / layer scale)
    # or "SGD" (detectron2's default optimizer).
    _c.SOLVER.OPTIMIZER = "AdamW"
    _c.SOLVER.BETAS = [0.9, 0.999]
    # Layer-wise lr decay of the backbone (lr * decay ** (12 - layer_id)); 1.0 disables it.
    _c.SOLVER.LAYER_DECAY = 0.75
    # Power of the polynomial schedule used when LR_SCHEDULER_NAME = "WarmupPolyLR".
    _c.SOLVER.POLY_LR_POWER = 1.0
    # Write metrics (console with ETA, metrics.json, tensorboard) every this many iterations.
    _c.SOLVER.LOG_PERIOD = 20
    # Mixed-precision dtype on CUDA ("bfloat16" or "float16"; float16 uses a GradScaler).
    _c.SOLVER.AMP.DTYPE = "bfloat16"
    # Keep only the newest this many periodic checkpoints (model_final.pth is always kept);
    # 0 keeps every one.
    _c.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0
    # A NaN / Inf loss term: "stop" (NonFiniteLossError naming the iteration, the terms and the
    # last good checkpoint) or "skip" (drop that batch's update, log and count it).
    _c.SOLVER.NONFINITE_LOSS = "stop"
    # "skip" mode stops after this many skipped batches.
    _c.SOLVER.NONFINITE_MAX_SKIPS = 10

    # ---------------------------------------------------------------- training data
    # A training image / label that cannot be read or does not match: False raises an error
    # naming the file; True logs it, counts it and replaces it by another image chosen from the
    # seed (the run stays reproducible). Batch i is a function of (SEED, i) in both cases.
    _c.DATALOADER.SKIP_BAD_SAMPLES = False
    return cfg


# ------------------------------------------------------------------------------ safe loading
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
# tags whose unsafe construction imports a module or calls / instantiates something
_CODE_TAGS = ("python/name:", "python/module:", "python/object:", "python/object/")
_UNKNOWN_TAG = re.compile(r"could not determine a constructor for the tag '([^']*)'")


def _short_tag(tag: str) -> str:
    """``tag:yaml.org,2002:python/name:x`` -> ``!!python/name:x`` (as written in the file)."""
    return "!!" + tag[len(_YAML_TAG_PREFIX) :] if tag.startswith(_YAML_TAG_PREFIX) else tag


def _tag_refusal(path: str, tag: str, line: Optional[int]) -> str:
    short = _short_tag(tag)
    code = short.startswith("!!") and short[2:].startswith(_CODE_TAGS)
    where = f" (line {line})" if line else ""
    why = "would run code" if code else "is not a plain value"
    return (
        f"{path}: refused: the YAML tag '{short}'{where} {why}; "
        "config files may only hold plain values"
    )


def _yaml_error_line(exc: yaml.YAMLError) -> Optional[int]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def _yaml_error_file(exc: yaml.YAMLError, default: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    name = getattr(mark, "name", None)
    return name if isinstance(name, str) and not name.startswith("<") else default


def _not_valid_yaml(exc: yaml.YAMLError, path: str) -> ConfigError:
    line = _yaml_error_line(exc)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" (line {line})" if line else ""
    return ConfigError(f"{_yaml_error_file(exc, path)}: not valid YAML{where}: {problem}")


def merge_config_file_safely(cfg: CN, path: str) -> CN:
    """Merge the yacs config file ``path`` and its ``_BASE_`` files into ``cfg`` (in place; also
    returned) without ever running code from them.

    The one yacs file load of the project: ``cfg.merge_from_file(path, allow_unsafe=False)``.
    fvcore then reads every file with ``yaml.safe_load`` and passes ``allow_unsafe=False`` on to
    each ``_BASE_`` (and the bases of those); its only fallback, ``yaml.unsafe_load``, is behind
    ``allow_unsafe``. Plain YAML configs resolve exactly as with detectron2's default merge.

    Raises:
        UnsafeConfigError: a YAML tag other than plain values (``!!python/...``), naming the file
            that holds it (a base file if it is there), the tag and the line.
        ConfigError: invalid YAML, or a ``_BASE_`` file that cannot be read.
        KeyError, ValueError, AssertionError: from yacs, for keys or values that do not fit.
    """
    try:
        cfg.merge_from_file(path, allow_unsafe=False)
    except yaml.constructor.ConstructorError as exc:
        found = _UNKNOWN_TAG.search(str(exc.problem or ""))
        holder = _yaml_error_file(exc, path)
        if found is None:
            raise _not_valid_yaml(exc, path) from None
        raise UnsafeConfigError(
            _tag_refusal(holder, found.group(1), _yaml_error_line(exc))
        ) from None
    except yaml.YAMLError as exc:
        raise _not_valid_yaml(exc, path) from None
    except OSError as exc:
        missing = exc.filename or str(exc)
        raise ConfigError(f"{path}: cannot read config file {missing}: {exc.strerror}") from None
    return cfg


# Modules whose classes and functions a LazyConfig ``.yaml`` may name (``_target_``,
# ``!!python/name``): what our configs build (models, data, optimizers, schedules, evaluators).
# A name is checked where it resolves (``detectron2.data.common.pickle.loads`` is ``_pickle``'s),
# after importing only modules of these packages. Anything else needs a ``.py`` config.
YAML_CALLABLE_MODULES = (
    "convmae_det.modeling",
    "convmae_det.data",
    "convmae_det.solver",
    "convmae_det.engine.optim",
    "convmae_det.engine.detection_eval",
    "convmae_det.evaluation",
    "detectron2.modeling",
    "detectron2.layers",
    "detectron2.data",
    "detectron2.solver",
    "detectron2.evaluation",
    "fvcore.common.param_scheduler",
    "torch.nn",
    "torch.optim",
    "timm.data.mixup",  # Mixup (classification recipes)
    "timm.loss",  # soft-target / label-smoothing cross entropy
    "timm.optim.lars",  # LARS (linear probing)
)
_IMPORTABLE_PACKAGES = {m.split(".")[0] for m in YAML_CALLABLE_MODULES}
# arguments of allowed callables that make detectron2 read a file with pickle.load (proposals:
# ``get_detection_dataset_dicts(proposal_files=)``, ``load_proposals_into_dataset``, and a
# ``cfg=`` passed to a ``@configurable`` loader)
_PICKLED_FILE_KEYS = (
    "proposal_files",
    "proposal_file",
    "PROPOSAL_FILES_TRAIN",
    "PROPOSAL_FILES_TEST",
)
_RESOLVER_CALL = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")


def _in_callable_modules(module: Any) -> bool:
    return isinstance(module, str) and any(
        module == m or module.startswith(m + ".") for m in YAML_CALLABLE_MODULES
    )


def _resolve_callable(name: str, path: str, what: str) -> Any:
    """The class / function ``name`` if it lives in :data:`YAML_CALLABLE_MODULES`; else
    :class:`UnsafeConfigError` naming ``what`` (where in ``path`` it was found)."""
    refusal = UnsafeConfigError(
        f"{path}: refused: {what} names '{name}', which is not in the modules a .yaml config may "
        f"call ({', '.join(YAML_CALLABLE_MODULES)}); anything else needs a .py config"
    )
    if name.split(".")[0] not in _IMPORTABLE_PACKAGES:
        raise refusal  # checked before importing anything
    from detectron2.utils.registry import locate

    try:
        obj = locate(name)
    except Exception:
        raise ConfigError(f"{path}: {what} names '{name}', which cannot be found") from None
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        raise refusal
    if not _in_callable_modules(getattr(obj, "__module__", None)):
        raise refusal
    return obj


class _LazyYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus exactly the Python forms ``LazyConfig.save`` writes for our
    configs, each built without running anything: ``!!python/tuple``, ``!!python/name`` of a
    class / function in :data:`YAML_CALLABLE_MODULES`, detectron2's ``ShapeSpec`` and
    ``functools.partial`` of such a name. Every other tag is refused."""


def _refuse_tag(loader: _LazyYamlLoader, node: yaml.Node) -> Any:
    raise UnsafeConfigError(_tag_refusal(loader.name, node.tag, node.start_mark.line + 1))


def _construct_tuple(loader: _LazyYamlLoader, node: yaml.Node) -> tuple:
    if not isinstance(node, yaml.SequenceNode):
        _refuse_tag(loader, node)
    return tuple(loader.construct_sequence(node, deep=True))


def _construct_name(loader: _LazyYamlLoader, suffix: str, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode) or loader.construct_scalar(node):
        _refuse_tag(loader, node)
    line = node.start_mark.line + 1
    return _resolve_callable(
        suffix, loader.name, f"the YAML tag '!!python/name:{suffix}' (line {line})"
    )


def _construct_shape_spec(loader: _LazyYamlLoader, node: yaml.Node) -> Any:
    from detectron2.layers import ShapeSpec

    fields = (
        loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else None
    )
    allowed = {"channels", "height", "width", "stride"}
    if not isinstance(fields, dict) or not set(fields) <= allowed:
        _refuse_tag(loader, node)
    if not all(
        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in fields.values()
    ):
        _refuse_tag(loader, node)
    return ShapeSpec(**fields)


def _construct_partial(loader: _LazyYamlLoader, node: yaml.Node) -> functools.partial:
    """``functools.partial(func, *args, **kwds)`` as ``yaml.dump`` writes it (``args: [func]``,
    ``state: (func, args, kwds, None)``); ``func`` can only come from a checked ``!!python/name``
    (or another partial), the arguments from plain values."""
    if not isinstance(node, yaml.MappingNode):
        _refuse_tag(loader, node)
    spec = loader.construct_mapping(node, deep=True)
    if not set(spec) <= {"args", "kwds", "state"}:
        _refuse_tag(loader, node)
    args, kwds, state = (
        list(spec.get("args") or []),
        dict(spec.get("kwds") or {}),
        spec.get("state"),
    )
    if state is not None:
        if not (isinstance(state, tuple) and len(state) == 4) or state[3]:
            _refuse_tag(loader, node)  # a partial's own __dict__ is never written for our configs
        args = [state[0], *(state[1] or ())]
        kwds = dict(state[2] or {})
    if not args or not callable(args[0]) or not all(isinstance(k, str) for k in kwds):
        _refuse_tag(loader, node)
    return functools.partial(args[0], *args[1:], **kwds)


_LazyYamlLoader.add_constructor(_YAML_TAG_PREFIX + "python/tuple", _construct_tuple)
_LazyYamlLoader.add_multi_constructor(_YAML_TAG_PREFIX + "python/name:", _construct_name)
_LazyYamlLoader.add_constructor(
    _YAML_TAG_PREFIX + "python/object:detectron2.layers.shape_spec.ShapeSpec", _construct_shape_spec
)
_LazyYamlLoader.add_constructor(
    _YAML_TAG_PREFIX + "python/object/apply:functools.partial", _construct_partial
)
_LazyYamlLoader.add_constructor(None, _refuse_tag)  # every other tag


def _check_lazy_values(node: Any, path: str, key: str, seen: Set[int]) -> None:
    """Refuse what would run code when a loaded ``.yaml`` LazyConfig is instantiated: a
    ``_target_`` outside :data:`YAML_CALLABLE_MODULES` or not written out, and OmegaConf resolver
    calls (``${oc.create:...}`` builds nodes, ``_target_`` included, when resolved), and
    proposal files (detectron2 unpickles them)."""
    if id(node) in seen:
        return
    if isinstance(node, (dict, list, tuple)):
        seen.add(id(node))
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if k == "_target_" and isinstance(v, str):
                if "${" in v:
                    raise UnsafeConfigError(
                        f"{path}: refused: '_target_' at key '{key or '<root>'}' is the "
                        f"interpolation {v!r}; a .yaml config must name its targets literally"
                    )
                _resolve_callable(v, path, f"'_target_' at key '{key or '<root>'}'")
            if k in _PICKLED_FILE_KEYS and v:
                raise UnsafeConfigError(
                    f"{path}: refused: key '{sub}' names proposal files, which detectron2 reads "
                    "with pickle (that can run code); set it in a .py config"
                )
            _check_lazy_values(v, path, sub, seen)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_lazy_values(v, path, f"{key}[{i}]", seen)
    elif isinstance(node, str) and _RESOLVER_CALL.search(node):
        raise UnsafeConfigError(
            f"{path}: refused: key '{key}' calls an OmegaConf resolver ({node[:60]!r}); a .yaml "
            "config may only use plain ${key} references"
        )


def load_lazy_config_safely(path: str) -> Any:
    """Load a LazyConfig file as ``LazyConfig.load(path)`` does, without running code from a YAML
    file: the one LazyConfig file load of the project.

    * ``.py``: ``LazyConfig.load`` — a Python config is code by design (read it before running).
    * ``.yaml`` / ``.yml`` (e.g. a run's ``config.yaml`` written by ``LazyConfig.save``): read with
      :class:`_LazyYamlLoader` instead of ``yaml.unsafe_load``; every ``_target_`` must be a class
      or function of :data:`YAML_CALLABLE_MODULES` and no value may call an OmegaConf resolver.
      The result is the ``DictConfig`` (``allow_objects``) ``LazyConfig.load`` would give.

    Raises:
        UnsafeConfigError: naming the file, the tag / key and why.
        ConfigError: another extension, invalid YAML, or not a mapping at the top level.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    if ext not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: a LazyConfig file must be a .py or a .yaml file")
    from omegaconf import OmegaConf

    with open(path, encoding="utf-8") as f:
        try:
            obj = yaml.load(f, Loader=_LazyYamlLoader)  # a restricted SafeLoader, see above
        except yaml.YAMLError as exc:
            raise _not_valid_yaml(exc, path) from None
    obj = {} if obj is None else obj
    if not isinstance(obj, dict):
        raise ConfigError(
            f"{path}: a LazyConfig .yaml must hold a mapping, not {type(obj).__name__}"
        )
    _check_lazy_values(obj, path, "", set())
    return OmegaConf.create(obj, flags={"allow_objects": True})
