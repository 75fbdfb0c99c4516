"""Switchable fast paths for ConvViT models (and any detectron2 model that contains one).

Every switch keeps the numbers of the plain path (checked in ``tests/test_fast_paths.py``):

* ``attn``: stage-3 attention through ``F.scaled_dot_product_attention`` ("sdpa") with the
  relative-position term as an additive mask (shared tables are built once per forward and
  broadcast over the batch; see :meth:`ConvViT.forward_stage3`), or the explicit QK^T, fp32
  softmax, @V ("explicit"). "auto" takes SDPA except when training on the CPU with a relative
  position bias: PyTorch's CPU SDPA kernel has no gradient for the mask, falls back to an fp32
  math path and is then about 1.6x slower than the explicit path (the CUDA kernels do have it);
* ``dtype="bf16"``: ``torch.autocast`` end to end. Matmuls and convolutions run in bf16, the
  residual stream, softmax statistics (SDPA kernels, the explicit path's ``float()``) and the
  detectron2 losses (cross entropy, BCE, smooth L1 are fp32 under autocast) stay fp32;
* ``channels_last``: NHWC memory for every 4-D weight, so the conv stages run on channels-last maps
  and the LayerNorm-over-channels permutes of :class:`ConvBlock` become free views;
* ``act_checkpoint``: recompute the blocks of the chosen stages (1, 2: conv blocks; 3: transformer
  blocks) in backward through ``torch.utils.checkpoint`` (non-reentrant); ``"attn"`` recomputes
  only the attention core of the stage-3 blocks (relative terms, QK^T, softmax, @V) where it would
  keep (B, heads, N, N) tensors: on the explicit path (logits / probabilities) and, with SDPA,
  in blocks with their own relative terms (per-block / decomposed: SDPA keeps their bias).
  Non-reentrant checkpointing stops the recomputation once the probabilities exist, so it
  costs one QK^T per block;
* ``compile``: ``nn.Module.compile`` of the backbone (in place, parameter names unchanged), which
  also fuses the LayerNorm / GELU / residual element-wise work of the conv stages.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as activation_checkpoint

from .utils.precision import PRECISIONS

__all__ = [
    "FastPaths",
    "PLAIN",
    "FAST",
    "DTYPES",
    "autocast",
    "find_convvit_encoders",
    "ATTN_CHOICES",
    "ACT_CHECKPOINT_CHOICES",
    "resolve_attn",
    "set_fused_attn",
    "set_act_checkpoint",
    "act_checkpoint_disabled",
    "set_channels_last",
    "apply_fast_paths",
    "fast_path_coverage",
]

ATTN_CHOICES = ("auto", "sdpa", "explicit")
# stages whose blocks are recomputed, and "attn": the attention core of the stage-3 blocks
ACT_CHECKPOINT_CHOICES = (1, 2, 3, "attn")

# the short spellings of the one precision table (``--dtype`` choices)
DTYPES: Dict[str, torch.dtype] = {name: PRECISIONS[name] for name in ("fp32", "bf16", "fp16")}


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths are on.

    Attributes:
        attn: "sdpa", "explicit" or "auto" (see the module docstring and :func:`resolve_attn`).
        dtype: "fp32" (no autocast), "bf16" or "fp16" (``torch.autocast`` with that dtype).
        channels_last: NHWC weights and inputs for the convolutions.
        act_checkpoint: what is recomputed in backward: stages whose blocks are recomputed, from
            (1, 2, 3), and/or ``"attn"`` for the attention core of the stage-3 blocks.
        compile: ``torch.compile`` the backbone.
    """

    attn: str = "auto"
    dtype: str = "fp32"
    channels_last: bool = False
    act_checkpoint: Tuple[int, ...] = ()
    compile: bool = False

    def __post_init__(self) -> None:
        if self.attn not in ATTN_CHOICES:
            raise ValueError(f"FastPaths.attn={self.attn!r}; expected one of {ATTN_CHOICES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"FastPaths.dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        bad = [s for s in self.act_checkpoint if s not in ACT_CHECKPOINT_CHOICES]
        if bad:
            raise ValueError(
                f"FastPaths.act_checkpoint stages {bad}; expected a subset of 1, 2, 3, 'attn'"
            )
        object.__setattr__(self, "act_checkpoint", tuple(sorted(set(self.act_checkpoint), key=str)))

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["act_checkpoint"] = list(self.act_checkpoint)
        return out


PLAIN = FastPaths(attn="explicit", dtype="fp32")
FAST = FastPaths(attn="auto", dtype="bf16", channels_last=True)


def autocast(device: torch.device | str, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` ("bf16"/"fp16") on ``device``; a no-op for "fp32"."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def find_convvit_encoders(model: nn.Module) -> List[nn.Module]:
    """Every ConvViT encoder inside ``model`` (the model itself included)."""
    from .modeling.convvit import ConvViT

    return [m for m in model.modules() if isinstance(m, ConvViT)]


def resolve_attn(
    model: nn.Module, attn: str, *, device: torch.device | str, training: bool
) -> bool:
    """Whether ``attn`` means SDPA for ``model`` on ``device`` (``training``: gradients flow)."""
    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn={attn!r}; expected one of {ATTN_CHOICES}")
    if attn != "auto":
        return attn == "sdpa"
    if torch.device(device).type != "cpu" or not training:
        return True
    return not any(enc.rel_pos != "none" for enc in find_convvit_encoders(model))


def set_fused_attn(model: nn.Module, fused: bool) -> int:
    """Switch every ConvViT attention module between SDPA and the explicit path. Returns how many
    modules were switched (other attention implementations, e.g. detectron2's ViT, are left as
    they are)."""
    from .modeling.convvit import Attention

    count = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused = fused
            count += 1
    return count


def _checkpointed_forward(module: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    if module.training and torch.is_grad_enabled():
        return activation_checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _checkpoint_module(module: nn.Module, on: bool) -> None:
    """Make ``module(...)`` recompute its forward in backward (or undo it). The bound forward is
    replaced on the instance only, so parameter names and state dicts do not change."""
    if on and "forward" not in module.__dict__:
        module.forward = functools.partial(_checkpointed_forward, module, module.forward)
    elif not on and "forward" in module.__dict__:
        del module.forward


def set_act_checkpoint(model: nn.Module, stages: Sequence[Any]) -> int:
    """Activation checkpointing per stage for every ConvViT in ``model``: stages 1 and 2 wrap each
    conv block, stage 3 uses the encoder's own ``use_act_checkpoint``, ``"attn"`` sets
    ``checkpoint_core`` of every stage-3 attention. What is not listed is switched off. Returns
    the number of checkpointed blocks (attention cores not counted)."""
    stages = set(stages)
    count = 0
    for enc in find_convvit_encoders(model):
        for s, blocks in ((1, enc.blocks1), (2, enc.blocks2)):
            for blk in blocks:
                _checkpoint_module(blk, s in stages)
                count += int(s in stages)
        enc.use_act_checkpoint = 3 in stages
        count += len(enc.blocks3) if 3 in stages else 0
        for blk in enc.blocks3:
            blk.attn.checkpoint_core = "attn" in stages
    return count


@contextlib.contextmanager
def act_checkpoint_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily turn off checkpointing in every ConvViT (e.g. to count model FLOPs without the
    recomputation)."""
    saved = []
    for enc in find_convvit_encoders(model):
        conv = [
            s
            for s, blocks in ((1, enc.blocks1), (2, enc.blocks2))
            if blocks and "forward" in blocks[0].__dict__
        ]
        core = ["attn"] if any(blk.attn.checkpoint_core for blk in enc.blocks3) else []
        saved.append((enc, conv + ([3] if enc.use_act_checkpoint else []) + core))
    for enc, _ in saved:
        set_act_checkpoint(enc, ())
    try:
        yield
    finally:
        for enc, stages in saved:
            set_act_checkpoint(enc, stages)


def set_channels_last(model: nn.Module, on: bool = True) -> nn.Module:
    """Store every 4-D parameter / buffer of ``model`` as channels-last (or contiguous)."""
    fmt = torch.channels_last if on else torch.contiguous_format
    return model.to(memory_format=fmt)


def _backbone_of(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def apply_fast_paths(
    model: nn.Module,
    paths: FastPaths,
    *,
    device: torch.device | str = "cpu",
    training: bool = False,
    compile_target: Optional[nn.Module] = None,
) -> nn.Module:
    """Apply ``paths`` to ``model`` in place and return it (every switch is set, so applying
    other paths later switches back).

    ``attn`` is resolved for ``device`` and ``training`` (see :func:`resolve_attn`). ``dtype`` is
    not applied here (it is an autocast region around the step, see :func:`autocast`);
    ``compile`` compiles ``compile_target`` (default: ``model.backbone`` if present, else ``model``)
    with ``nn.Module.compile``.
    """
    set_fused_attn(model, resolve_attn(model, paths.attn, device=device, training=training))
    set_act_checkpoint(model, paths.act_checkpoint)
    set_channels_last(model, paths.channels_last)
    if paths.compile:
        target = compile_target if compile_target is not None else _backbone_of(model)
        target.compile(dynamic=False)
    return model


def fast_path_coverage(model: nn.Module) -> Dict[str, int]:
    """How much of ``model`` the switches reach: ConvViT encoders, their attention modules (and
    how many use SDPA), and checkpointed blocks."""
    from .modeling.convvit import Attention

    attn = [m for m in model.modules() if isinstance(m, Attention)]
    encoders = find_convvit_encoders(model)
    ckpt = 0
    for enc in encoders:
        ckpt += sum("forward" in blk.__dict__ for blk in list(enc.blocks1) + list(enc.blocks2))
        ckpt += len(enc.blocks3) if enc.use_act_checkpoint else 0
    return {
        "convvit_encoders": len(encoders),
        "attention_modules": len(attn),
        "sdpa_attention_modules": sum(m.fused for m in attn),
        "checkpointed_blocks": ckpt,
    }
