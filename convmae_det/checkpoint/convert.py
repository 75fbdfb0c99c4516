"""Map the weights of any supported checkpoint onto a model, explicitly, and say what happened.

The mapping never relies on suffix heuristics. It works in three steps:

1. *Unwrap*: find the weights (``model``, ``state_dict``, ``model_state`` or the dict itself),
   drop a DDP ``module.`` prefix, turn numpy arrays into tensors, and name the format.
2. *Locate the encoder* on both sides: the prefix in front of ``patch_embed1.proj.weight``
   (ConvViT) or ``patch_embed.proj.weight`` (plain ViT), e.g. ``""`` in a pretraining file,
   ``backbone.`` in EasyCV / mmseg files, ``backbone.bottom_up.`` or ``backbone.net.`` in
   detectron2 models. Encoder keys are re-rooted from one prefix to the other; other keys keep
   their name (same-layout fine-tuned files) or go through a registered key mapper (e.g. mmseg
   heads -> ours).
3. *Adapt*: ``pos_embed`` loses a cls position and is resized bicubically to the target's grid;
   BEiT relative tables are resized bicubically, decomposed ``rel_pos_h/w`` linearly.

Everything else is classified in a :class:`CheckpointReport`: loaded, resized, intentionally
ignored (by group: pretraining decoder, final norm, classifier, recomputed buffers, ...),
initialised fresh by design (relative-position tables, layer scale, heads when the file has
none), missing, unexpected, shape-mismatched. ``strict=True`` raises on anything unexplained.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.table_resize import infer_grid, resize_pos_embed, resize_rel_pos_table
from .io import CheckpointError, to_tensor_dict

__all__ = [
    "CheckpointReport",
    "unwrap_checkpoint",
    "detect_format",
    "find_encoder_prefix",
    "convert_checkpoint",
    "extract_encoder",
    "encoder_coverage",
    "MIN_ENCODER_COVERAGE",
    "register_key_mapper",
]

_ENCODER_ANCHORS = (("patch_embed1.proj.weight", "convvit"), ("patch_embed.proj.weight", "vit"))
_CONTAINER_KEYS = ("model", "state_dict", "model_state", "module", "net")

# Source keys (relative to the encoder, or at the top level) that a downstream model does not
# use, by the group the report shows them under. Only applied when the target lacks the key.
_IGNORED_GROUPS: List[Tuple[str, re.Pattern]] = [
    ("pretraining decoder", re.compile(r"^(decoder_\w+|mask_token)(\.|$)")),
    ("pretraining multi-scale fusion", re.compile(r"^stage\d_output_decode\.")),
    ("Mixture-of-Reconstructors / EMA targets", re.compile(r"^mor[\w]*\.")),
    ("final norm (downstream models have none)", re.compile(r"^(norm|fc_norm)\.(weight|bias)$")),
    ("classification head", re.compile(r"^head\.")),
    ("cls token", re.compile(r"^cls_token$")),
    ("recomputed buffers", re.compile(r"(^|\.)relative_position_index$")),
    ("recomputed buffers", re.compile(r"(^|\.)num_batches_tracked$")),
]

# Target keys that a backbone checkpoint does not contain by design.
_NEW_BY_DESIGN = re.compile(
    r"(^|\.)(relative_position_bias_table|rel_pos_h|rel_pos_w|gamma_1|gamma_2)$"
)
# A classifier's head and its pooled-feature norm (keys relative to the encoder): fresh when the
# file has none (a pretraining checkpoint) or one for another class count.
_CLASSIFIER_HEAD = re.compile(r"^(fc_norm|head)\.")
_FRESH_HEAD = "classification head (fresh: not in the checkpoint)"

KeyMapper = Callable[[str, str], Optional[str]]
_KEY_MAPPERS: "OrderedDict[str, KeyMapper]" = OrderedDict()


def register_key_mapper(name: str, fn: KeyMapper) -> None:
    """Register ``fn(source_key, source_format) -> target_key or None`` for non-encoder keys
    (heads) of a foreign layout, e.g. mmseg's ``decode_head.*``. Later registrations with the
    same name replace earlier ones."""
    _KEY_MAPPERS[name] = fn


@dataclass
class CheckpointReport:
    """What :func:`convert_checkpoint` did with each key. Lists hold target-side key names
    except ``unexpected`` and ``ignored`` (source names)."""

    source: str = ""
    format: str = "unknown"
    loaded: List[str] = field(default_factory=list)
    resized: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: Dict[str, List[str]] = field(default_factory=dict)
    initialised: Dict[str, List[str]] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def problems(self) -> int:
        """Number of unexplained keys (what ``strict`` refuses)."""
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    @property
    def missing_encoder_keys(self) -> List[str]:
        return list(self.missing)

    def summary(self, max_keys: int = 12) -> str:
        lines = [f"Checkpoint report for {self.source or '<dict>'} (format: {self.format})"]
        lines.append(f"  loaded: {len(self.loaded)}")
        if self.resized:
            lines.append(f"  resized: {len(self.resized)}")
            lines += [f"    {k}: {tuple(a)} -> {tuple(b)}" for k, a, b in self.resized[:max_keys]]
        n_ign = sum(len(v) for v in self.ignored.values())
        lines.append(f"  intentionally ignored: {n_ign}")
        for group, keys in self.ignored.items():
            lines.append(f"    {group}: {len(keys)} ({_compact(keys, max_keys)})")
        n_new = sum(len(v) for v in self.initialised.values())
        lines.append(f"  initialised fresh (not in this kind of checkpoint): {n_new}")
        for group, keys in self.initialised.items():
            lines.append(f"    {group}: {len(keys)} ({_compact(keys, max_keys)})")
        lines.append(f"  missing: {len(self.missing)}" + _suffix(self.missing, max_keys))
        lines.append(f"  unexpected: {len(self.unexpected)}" + _suffix(self.unexpected, max_keys))
        lines.append(f"  shape-mismatched: {len(self.mismatched)}")
        lines += [
            f"    {k}: checkpoint {tuple(a)} vs model {tuple(b)}"
            for k, a, b in self.mismatched[:max_keys]
        ]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-type summary (counts and key lists), safe to store in a checkpoint."""
        return {
            "source": self.source,
            "format": self.format,
            "loaded": len(self.loaded),
            "resized": [[k, list(a), list(b)] for k, a, b in self.resized],
            "ignored": {g: list(v) for g, v in self.ignored.items()},
            "initialised": {g: list(v) for g, v in self.initialised.items()},
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched],
        }


def _compact(keys: List[str], max_keys: int) -> str:
    """Collapse numbered keys: blocks3.0.attn.qkv.weight, blocks3.1... -> blocks3.*.attn.qkv.weight."""
    patterns: "OrderedDict[str, int]" = OrderedDict()
    for k in keys:
        p = re.sub(r"\.\d+(?=\.|$)", ".*", k)
        patterns[p] = patterns.get(p, 0) + 1
    items = [p if n == 1 else f"{p} x{n}" for p, n in patterns.items()]
    more = f", ... +{len(items) - max_keys} more" if len(items) > max_keys else ""
    return ", ".join(items[:max_keys]) + more


def _suffix(keys: List[str], max_keys: int) -> str:
    return f" ({_compact(keys, max_keys)})" if keys else ""


# --------------------------------------------------------------------------- unwrapping
def unwrap_checkpoint(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The weight dict inside a loaded checkpoint (tensors only), without a DDP prefix."""
    state: Any = ckpt
    for _ in range(2):  # e.g. {"state_dict": {"model": ...}} is not seen, but be lenient
        for key in _CONTAINER_KEYS:
            inner = state.get(key) if isinstance(state, Mapping) else None
            if isinstance(inner, Mapping) and inner and _mostly_arrays(inner):
                state = inner
                break
        else:
            break
    if not isinstance(state, Mapping) or not _mostly_arrays(state):
        keys = list(ckpt.keys())[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"no weights found: expected a dict of tensors, optionally under one of "
            f"{list(_CONTAINER_KEYS)}; top-level keys are {keys}"
        )
    state = to_tensor_dict(dict(state))
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _mostly_arrays(d: Mapping) -> bool:
    vals = list(d.values())
    if not vals:
        return False
    n = sum(1 for v in vals if isinstance(v, torch.Tensor) or hasattr(v, "__array__"))
    return n >= max(1, len(vals) // 2)


def find_encoder_prefix(keys) -> Tuple[Optional[str], Optional[str]]:
    """(prefix, kind) of the encoder among ``keys``; the shortest prefix wins (an EMA copy
    inside a pretraining checkpoint must not be taken for the encoder)."""
    best: Tuple[Optional[str], Optional[str]] = (None, None)
    for anchor, kind in _ENCODER_ANCHORS:
        for k in keys:
            if k.endswith(anchor) and (k == anchor or k[: -len(anchor)].endswith(".")):
                prefix = k[: -len(anchor)]
                if best[0] is None or len(prefix) < len(best[0]):
                    best = (prefix, kind)
        if best[0] is not None:
            return best
    return best


def detect_format(state: Mapping[str, Any]) -> str:
    """A name for the layout of a weight dict (used in reports and by key mappers)."""
    keys = list(state.keys())
    prefix, kind = find_encoder_prefix(keys)
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    if prefix is None:
        return "unknown"
    if kind == "vit":
        if prefix == "":
            return "mae_vit"
        if prefix == "backbone.net.":
            return "detectron2_vitdet"
        return "vit_" + prefix.rstrip(".").replace(".", "_")
    if prefix == "backbone.bottom_up.":
        return "detectron2_convvitdet_fpn"  # paper detector layout (official or ours)
    if prefix == "backbone.net.":
        return "detectron2_convmae_vitdet"  # Official-ConvMAE-Det layout (or ours)
    if prefix == "backbone." and has("decode_head."):
        return "mmseg_upernet_convmae"
    if prefix == "backbone." and has("sem_seg_head."):
        return "convmae_det_upernet"
    if prefix in ("backbone.", "encoder.", "backbone.encoder."):
        return "easycv_convvit"
    if prefix == "":
        if has("decoder_embed.") or has("mask_token") or has("stage1_output_decode."):
            return "convmae_pretrain"
        if has("head.") or has("fc_norm."):
            return "convvit_imagenet_finetune"
        if has("cls_token"):
            return "convmae_v2_encoder"
        return "convvit_encoder"
    return "convvit_" + prefix.rstrip(".").replace(".", "_")


# --------------------------------------------------------------------------- adapting
def _encoder_module(model: nn.Module, prefix: str) -> nn.Module:
    return model.get_submodule(prefix.rstrip(".")) if prefix else model


def _adapt_pos_embed(src: torch.Tensor, tgt_shape: torch.Size, tgt_hw) -> torch.Tensor:
    """(1, [cls +] h*w, C) -> the target's (1, [cls +] H*W, C); the grid part is resized."""
    n_src, n_tgt = src.shape[1], tgt_shape[1]
    src_extra = _cls_count(n_src)
    if tgt_hw is not None and tgt_hw[0] * tgt_hw[1] <= n_tgt:
        tgt_grid, tgt_extra = tuple(tgt_hw), n_tgt - tgt_hw[0] * tgt_hw[1]
    else:
        tgt_extra = _cls_count(n_tgt)
        tgt_grid = infer_grid(n_tgt - tgt_extra)
    grid = resize_pos_embed(src[:, src_extra:], infer_grid(n_src - src_extra), tgt_grid)
    if tgt_extra:
        if src_extra >= tgt_extra:
            tok = src[:, :tgt_extra]
        else:
            tok = torch.zeros(1, tgt_extra, src.shape[-1], dtype=src.dtype)
        grid = torch.cat([tok, grid], dim=1)
    return grid


def _cls_count(n: int) -> int:
    """1 when n = side^2 + 1 (a cls position in front of a square grid), else 0."""
    side = int(round(math.sqrt(n)))
    if side * side == n:
        return 0
    side = int(round(math.sqrt(n - 1)))
    return 1 if side * side == n - 1 else 0


def _adapt_rel_table(src: torch.Tensor, tgt_shape: torch.Size) -> torch.Tensor:
    def side(n: int) -> int:
        s = int(round(math.sqrt(n)))
        if s * s != n or s % 2 == 0:
            raise ValueError(f"relative-position table of {n} rows is not (2s-1)^2")
        return (s + 1) // 2

    s_src, s_tgt = side(src.shape[0]), side(tgt_shape[0])
    return resize_rel_pos_table(src, (s_src, s_src), (s_tgt, s_tgt))


def _adapt_decomposed(src: torch.Tensor, tgt_shape: torch.Size) -> torch.Tensor:
    out = F.interpolate(
        src.t()[None].float(), size=tgt_shape[0], mode="linear", align_corners=False
    )
    return out[0].t().to(src.dtype)


def _adapt(rel: str, value: torch.Tensor, tgt: torch.Tensor, enc: Optional[nn.Module]):
    """Return the value reshaped for the target, or None if it cannot be adapted."""
    if value.shape == tgt.shape:
        return value
    try:
        if rel == "pos_embed" and value.dim() == 3 and value.shape[-1] == tgt.shape[-1]:
            hw = getattr(enc, "pos_embed_hw", None) if enc is not None else None
            return _adapt_pos_embed(value, tgt.shape, hw)
        if rel.endswith("relative_position_bias_table") and value.shape[1:] == tgt.shape[1:]:
            return _adapt_rel_table(value, tgt.shape)
        if (rel.endswith("rel_pos_h") or rel.endswith("rel_pos_w")) and (
            value.shape[1:] == tgt.shape[1:]
        ):
            return _adapt_decomposed(value, tgt.shape)
    except ValueError:
        return None
    return None


def _ignored_group(rel: str) -> Optional[str]:
    for group, pattern in _IGNORED_GROUPS:
        if pattern.search(rel):
            return group
    return None


# --------------------------------------------------------------------------- conversion
def convert_checkpoint(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    *,
    strict: bool = False,
    source: str = "",
) -> Tuple[Dict[str, torch.Tensor], CheckpointReport]:
    """Map a loaded checkpoint onto ``model``.

    Args:
        ckpt: what :func:`load_checkpoint_file` returned (or a bare state dict).
        model: the target; only its ``state_dict()`` keys/shapes and the ``pos_embed_hw`` of its
            encoder are read, nothing is modified.
        strict: raise :class:`CheckpointError` when the report has missing encoder keys,
            unexpected keys or shape mismatches.
    Returns:
        (state dict with target key names and shapes, report). Load it with
        ``model.load_state_dict(state, strict=False)``.
    """
    src = unwrap_checkpoint(ckpt)
    fmt = detect_format(src)
    report = CheckpointReport(source=source, format=fmt)
    target = model.state_dict()
    src_prefix, src_kind = find_encoder_prefix(src.keys())
    tgt_prefix, tgt_kind = find_encoder_prefix(target.keys())
    enc = _encoder_module(model, tgt_prefix) if tgt_prefix is not None else None
    reroot = src_prefix is not None and tgt_prefix is not None and src_kind == tgt_kind

    out: Dict[str, torch.Tensor] = {}
    for key, value in src.items():
        rel = None
        if reroot and key.startswith(src_prefix):
            rel = key[len(src_prefix) :]
            dest = tgt_prefix + rel
        elif key in target:
            dest = key
        else:
            dest = None
            for mapper in _KEY_MAPPERS.values():
                dest = mapper(key, fmt)
                if dest is not None:
                    break
        if dest is not None and dest in target:
            adapted = _adapt(rel if rel is not None else key, value, target[dest], enc)
            if adapted is None and rel is not None and _CLASSIFIER_HEAD.match(rel):
                group = (
                    f"classification head of another size (file {tuple(value.shape)}, "
                    f"model {tuple(target[dest].shape)}): fresh"
                )
                report.ignored.setdefault(group, []).append(key)
                continue
            if adapted is None:
                report.mismatched.append((dest, tuple(value.shape), tuple(target[dest].shape)))
                continue
            if adapted.shape != value.shape:
                report.resized.append((dest, tuple(value.shape), tuple(adapted.shape)))
            out[dest] = adapted.to(target[dest].dtype)
            report.loaded.append(dest)
            continue
        group = _ignored_group(rel if rel is not None else key)
        if group is not None:
            report.ignored.setdefault(group, []).append(key)
        else:
            report.unexpected.append(key)

    src_has_heads = any(
        not (src_prefix is not None and k.startswith(src_prefix)) and _ignored_group(k) is None
        for k in src
    )
    for key in target:
        if key in out:
            continue
        in_encoder = tgt_prefix is not None and key.startswith(tgt_prefix)
        rel = key[len(tgt_prefix) :] if in_encoder else key
        if key.endswith("num_batches_tracked"):
            report.initialised.setdefault("batch-norm counters", []).append(key)
        elif in_encoder and _NEW_BY_DESIGN.search(rel) and not _has_same_kind(src, rel):
            report.initialised.setdefault(
                "relative positions / layer scale (zero or 1.0 init)", []
            ).append(key)
        elif in_encoder and _CLASSIFIER_HEAD.match(rel):
            report.initialised.setdefault(_FRESH_HEAD, []).append(key)
        elif in_encoder and rel.startswith(("fpn.", "ms_adaptor.")):
            report.initialised.setdefault("backbone adaptor (E4)", []).append(key)
        elif in_encoder and src_prefix is not None:
            report.missing.append(key)
        elif not in_encoder and not src_has_heads:
            report.initialised.setdefault("necks and heads (not in a backbone checkpoint)", []).append(key)  # fmt: skip
        else:
            report.missing.append(key)

    if strict and report.problems:
        raise CheckpointError(
            f"{source or 'checkpoint'}: strict loading failed: {len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected, {len(report.mismatched)} shape-mismatched "
            f"keys.\n{report.summary()}"
        )
    return out, report


MIN_ENCODER_COVERAGE = 0.5
"""Below this fraction of the target encoder's tensors loaded, ``tools/convert_checkpoint.py``
refuses to write the result (a checkpoint that matches nothing would otherwise give a file of
fresh weights and exit 0); ``--allow-partial`` writes it anyway."""


def encoder_coverage(report: CheckpointReport, model_keys: Iterable[str]) -> Tuple[int, int, str]:
    """How much of the target's encoder a conversion filled.

    Args:
        report: what :func:`convert_checkpoint` returned for the model.
        model_keys: the model's ``state_dict()`` keys.
    Returns:
        ``(loaded, total, scope)``: tensors of the encoder (keys under the prefix of
        ``patch_embed1.proj.weight`` / ``patch_embed.proj.weight``; the whole model when it has
        no such encoder) taken from the checkpoint, how many the encoder has (BatchNorm counters
        excluded), and a name for the scope (e.g. ``"encoder backbone.bottom_up.*"``).
    """
    keys = [k for k in model_keys if not k.endswith("num_batches_tracked")]
    prefix, _ = find_encoder_prefix(keys)
    if prefix is not None:
        keys = [k for k in keys if k.startswith(prefix)]
    scope = "model" if prefix is None else f"encoder {prefix}*" if prefix else "encoder"
    loaded = len(set(report.loaded) & set(keys))
    return loaded, len(keys), scope


def _has_same_kind(src: Mapping[str, Any], rel: str) -> bool:
    """Whether the source carries tables of this kind at all (then a missing one is a problem)."""
    leaf = rel.rsplit(".", 1)[-1]
    return any(k.endswith("." + leaf) or k == leaf for k in src)


def extract_encoder(ckpt: Mapping[str, Any], *, source: str = "") -> Tuple[Dict[str, torch.Tensor], CheckpointReport]:  # fmt: skip
    """Without a target model: the encoder weights under their canonical (top-level) names,
    with pretraining-only parts (decoder, mask token, final norm, head, ...) dropped."""
    src = unwrap_checkpoint(ckpt)
    report = CheckpointReport(source=source, format=detect_format(src))
    prefix, _ = find_encoder_prefix(src.keys())
    if prefix is None:
        raise CheckpointError(
            f"{source or 'checkpoint'}: no ConvViT / ViT encoder found (no key ending in "
            "'patch_embed1.proj.weight' or 'patch_embed.proj.weight'); pass --config-file to map "
            "it onto a model instead"
        )
    out: Dict[str, torch.Tensor] = {}
    for key, value in src.items():
        rel = key[len(prefix) :] if key.startswith(prefix) else None
        group = _ignored_group(rel if rel is not None else key)
        if rel is not None and group is None:
            out[rel] = value
            report.loaded.append(rel)
        elif group is not None:
            report.ignored.setdefault(group, []).append(key)
        else:
            report.ignored.setdefault("outside the encoder (necks, heads)", []).append(key)
    return out, report
