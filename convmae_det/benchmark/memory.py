"""Who keeps the saved activations of a training step: bytes per stage and per tensor kind, on the
CPU path and on the path CUDA takes.

    from convmae_det.benchmark import BenchmarkConfig
    from convmae_det.benchmark.memory import memory_breakdown
    from convmae_det.fast_paths import FastPaths
    paths = FastPaths(dtype="bf16", channels_last=True)
    cfg = BenchmarkConfig(preset="convvitdet_b", image_size=(1024, 1024), paths=paths)
    cpu = memory_breakdown(cfg, path="cpu")    # {"total_bytes", "by_stage", "by_kind", ...}
    gpu = memory_breakdown(cfg, path="cuda")

What is counted: the storages that autograd saves for backward during one forward (parameters
excluded, inputs held by a checkpointed region included), each storage once however many tensors
view it or ops save it, with its full size. This is the quantity
``saved_activation_bytes_per_img`` of the runner reports; it decides how many images fit on a card.

Attribution, recorded when autograd packs a tensor (``saved_tensors_hooks``) while module forward
pre/post hooks keep the stack of running modules:

* **stage**: of the first module that saves the storage. Inside a ConvViT encoder: ``stage1``
  (``patch_embed1``, ``blocks1``), ``stage2`` (``patch_embed2``, ``blocks2``), ``stage3``
  (everything else: ``patch_embed3/4``, ``blocks3``, the shared relative-position tables, the
  encoder's own code such as the E4 pooling); detectron2's ViT is all ``stage3`` (one stage at
  stride 16). Outside the encoder: ``neck`` (the rest of ``model.backbone``: FPN / simple feature
  pyramid), ``rpn`` (``proposal_generator``), ``roi_heads``, ``head`` (other heads), ``other``.
* **kind** (see :data:`KIND_NOTES`): from the module stack and the autograd node that made the
  tensor (its first node that is not a view or copy): ``attn_matrix`` for (.., N, N) softmax
  outputs of an attention module (N = its token count), ``rel_pos`` for relative-position terms
  (N x N additive biases kept by an attention kernel, table gathers and their index tensors),
  ``attn_io`` for the other tensors an attention keeps (qkv input and output, scaled q, output,
  log-sum-exp), ``mlp``, ``norm`` (LayerNorm / GroupNorm inputs and statistics), ``conv``
  (conv-stage blocks and patch embeddings, other convolutions), ``checkpoint_input`` (inputs held
  by ``torch.utils.checkpoint``), ``weight_cast`` (autocast's low-precision copies of weights:
  per step, not per image), ``other``. A storage saved as several kinds gets the first of
  :data:`KIND_PRIORITY`.

The CUDA path (``path="cuda"``) is counted on the CPU by running what CUDA runs, op for op where it
matters for saved memory:

* attention: ConvViT attention takes SDPA (``attn="auto"`` on CUDA), and every
  ``F.scaled_dot_product_attention`` call is replaced by a function that keeps exactly what
  PyTorch's CUDA memory-efficient kernel keeps for backward (the kernel used for a bf16 SDPA with
  an additive mask that needs a gradient): q, k, v, the mask as the kernel's preprocessing
  leaves it (expanded to (B, heads, N, N); a padded copy if N is not a multiple of 16, so a mask
  shared by the windows is then materialised for every window; a contiguous copy if a stride is
  not a multiple of 16, e.g. a gathered (heads, N, N) table with the heads innermost), the output
  stored as (B, N, heads, d), and the float32 log-sum-exp (B, heads, ceil(N / 32) * 32). No N x N
  probability matrix. Its backward recomputes the probabilities, as the kernel does. (The cuDNN
  kernel keeps the same tensors; flash attention takes no additive mask.)
* autocast: CUDA's autocast runs ``layer_norm``, ``group_norm``, ``softmax``, ``log_softmax``,
  ``exp``, ``log``, ``pow``, ``sum`` and the other ops of its float32 list in float32, where
  CPU autocast keeps bfloat16 (``torch.amp`` documentation, "CUDA Ops that can autocast to
  float32"). The CUDA path casts the inputs of those ops to float32, so e.g. the conv stages'
  LayerNorm outputs and the explicit softmax of detectron2's ViT are float32 as on a GPU.

detectron2's own ViT (``vitdet_b``) has no SDPA path: it keeps its softmax matrices on a GPU too.

Fake tensors: for the backbone modes the forward runs on ``FakeTensor`` s (shapes, dtypes, views
and storages, no data, no memory), so 1024x1024 Base models are counted in seconds. The only
difference to real tensors is that the fake LayerNorm returns its statistics in the input dtype
while the CPU and CUDA kernels return float32; the count corrects for it (the tests check fake ==
real). Full detectors (mode ``train``) need real data (proposal sampling, mask targets) and run for
real, forward only, and the count drops every saved tensor at once, so the run needs only the
transient memory of a forward pass.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..fast_paths import (
    FastPaths,
    apply_fast_paths,
    autocast,
    find_convvit_encoders,
    resolve_attn,
    set_act_checkpoint,
    set_fused_attn,
)
from .measure import count_flops
from .subjects import BenchmarkSetupError, _scalar_from, make_step, synthetic_detection_batch

__all__ = [
    "KINDS",
    "KIND_NOTES",
    "KIND_PRIORITY",
    "STAGES",
    "MEMORY_PATHS",
    "DEFAULT_SWEEP",
    "SavedTensorCensus",
    "cuda_path_emulation",
    "fake_model",
    "memory_breakdown",
    "checkpoint_sweep",
    "format_breakdown_table",
    "format_sweep_table",
]

KIND_NOTES: Dict[str, str] = {
    "attn_matrix": "(.., N, N) attention probabilities / logits (softmax outputs and their copies)",
    "rel_pos": "relative-position terms: N x N additive biases, table gathers and index tensors",
    "attn_io": "other attention tensors: qkv input and output, scaled q, output, log-sum-exp",
    "mlp": "MLP: fc1 input, GELU input, fc2 input",
    "norm": "LayerNorm / GroupNorm inputs and statistics (the residual stream)",
    "conv": "conv-stage blocks and patch embeddings (1x1 / depthwise conv inputs), other convs",
    "checkpoint_input": "inputs held by a checkpointed region (torch.utils.checkpoint)",
    "weight_cast": "autocast's low-precision weight copies (per step, not per image)",
    "other": "everything else (residual-free glue, heads' linear layers, losses, pooling)",
}
KINDS: Tuple[str, ...] = tuple(KIND_NOTES)
# a storage saved as several kinds is counted as the first of these
KIND_PRIORITY: Tuple[str, ...] = (
    "weight_cast",
    "attn_matrix",
    "attn_io",
    "norm",
    "mlp",
    "conv",
    "rel_pos",
    "other",
    "checkpoint_input",
)
STAGES: Tuple[str, ...] = (
    "stage1",
    "stage2",
    "stage3",
    "neck",
    "rpn",
    "roi_heads",
    "head",
    "other",
)
MEMORY_PATHS = ("cpu", "cuda")

# act_checkpoint policies measured by checkpoint_sweep
DEFAULT_SWEEP: Tuple[Tuple[Any, ...], ...] = (
    (),
    (1,),
    (2,),
    (1, 2),
    (3,),
    (1, 2, 3),
    ("attn",),
    (1, "attn"),
    (2, "attn"),
    (1, 2, "attn"),
)

# autograd nodes that only view or copy their input (skipped to find the op that made a tensor)
_VIEW_NODES = frozenset(
    {
        "View",
        "UnsafeView",
        "ReshapeAlias",
        "Transpose",
        "Permute",
        "Expand",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Select",
        "AsStrided",
        "Alias",
        "Unbind",
        "Split",
        "SplitWithSizes",
        "Clone",
        "ToCopy",
        "ConstantPadNd",
        "T",
    }
)
_SOFTMAX_NODES = frozenset({"Softmax", "_SafeSoftmax", "LogSoftmax"})
_BIAS_NODES = frozenset({"Index", "IndexSelect", "Gather", "Add", "Sub", "MaskedFill", "Where"})
_INDEX_NODES = frozenset({"Index", "IndexSelect", "Gather"})

_MEM_EFF_MASK_ALIGN = 16  # PyTorch's preprocess_mask for the memory-efficient kernel
_MEM_EFF_LSE_ALIGN = 32  # kAlignLSE: rows of the kernel's log-sum-exp


# ------------------------------------------------------------------------------ classification
def _node_name(node: Any) -> str:
    name = type(node).__name__
    for suffix in ("Backward0", "Backward1", "Backward2", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _origin(t: torch.Tensor) -> Optional[str]:
    """Name of the first autograd node behind ``t`` that is not a view or copy (None: no grad_fn;
    "AccumulateGrad": a view / cast of a leaf such as a weight)."""
    node = t.grad_fn
    for _ in range(32):
        if node is None:
            return None
        name = _node_name(node)
        if name not in _VIEW_NODES:
            return name
        nxt = [n for n, _ in node.next_functions if n is not None]
        if not nxt:
            return name
        node = nxt[0]
    return _node_name(node)


def _attention_types() -> Tuple[type, ...]:
    from ..modeling.convvit import Attention

    types: List[type] = [Attention]
    with contextlib.suppress(ImportError):
        from detectron2.modeling.backbone.vit import Attention as D2Attention

        types.append(D2Attention)
    return tuple(types)


def _encoder_types() -> Tuple[type, ...]:
    from ..modeling.convvit import ConvViT

    types: List[type] = [ConvViT]
    with contextlib.suppress(ImportError):
        from detectron2.modeling.backbone.vit import ViT

        types.append(ViT)
    return tuple(types)


def _is_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
        name.endswith("Norm") or name.endswith("Norm2d") or name == "FrozenBatchNorm2d"
    )


def _is_mlp(m: nn.Module) -> bool:
    return type(m).__name__.endswith("Mlp")


def _is_conv_part(m: nn.Module) -> bool:
    return type(m).__name__ in ("ConvBlock", "PatchEmbed") or isinstance(m, nn.modules.conv._ConvNd)


def _in_checkpoint_save() -> bool:
    """Whether the pack hook was called by ``torch.utils.checkpoint`` saving a region's inputs."""
    suffix = os.path.join("utils", "checkpoint.py")
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(suffix):
            return True
        frame = frame.f_back
    return False


_STAGE_OF_CHILD = {"patch_embed1": "stage1", "blocks1": "stage1"}
_STAGE_OF_CHILD.update({"patch_embed2": "stage2", "blocks2": "stage2"})
_STAGE_OF_ROOT_CHILD = {
    "backbone": "neck",
    "proposal_generator": "rpn",
    "roi_heads": "roi_heads",
}


class SavedTensorCensus:
    """Context manager that records every storage autograd saves while it is active.

    Args:
        model: the module whose forward runs inside (its parameters are excluded, its submodules
            give the attribution).
        keep: hand the tensors to autograd as usual (True), or keep only their sizes (False: the
            forward cannot be followed by a backward, but no saved tensor stays alive).
        fake: the forward runs on fake tensors (corrects their LayerNorm statistics dtype).

    After the block, :meth:`result` gives the breakdown.
    """

    def __init__(self, model: nn.Module, *, keep: bool = False, fake: bool = False):
        self.model = model
        self.keep = keep
        self.fake = fake
        self.records: Dict[int, Dict[str, Any]] = {}
        self._alive: Dict[int, Any] = {}
        self._current: Dict[int, int] = {}
        self._names = {id(m): n for n, m in model.named_modules()}
        self._params = {p.untyped_storage()._cdata for p in model.parameters()}
        self._stack: List[Tuple[nn.Module, Optional[int]]] = []
        self._handles: List[Any] = []
        self._hooks: Optional[contextlib.AbstractContextManager] = None
        self._attn_types = _attention_types()
        self._encoder_types = _encoder_types()
        self._root_is_model = any(
            hasattr(model, a) for a in ("backbone", "roi_heads", "proposal_generator")
        )

    # ---------------------------------------------------------------- hooks
    def _pre(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        tokens = None
        if isinstance(module, self._attn_types) and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            tokens = x.shape[1] if x.dim() == 3 else math.prod(x.shape[1:-1])
        self._stack.append((module, tokens))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] is module:
                del self._stack[i:]
                break

    def _context(self) -> Tuple[str, str, str, Optional[int]]:
        """(stage, block, role, attention tokens) of the running module stack."""
        stack = self._stack
        stage, block = "other", "(root)"
        encoders = [i for i, (m, _) in enumerate(stack) if isinstance(m, self._encoder_types)]
        enc = encoders[0] if encoders else None
        if enc is not None:
            enc_name = self._names.get(id(stack[enc][0]), "")
            stage, block = "stage3", "(encoder)"
            if enc + 1 < len(stack):
                child = self._names.get(id(stack[enc + 1][0]), "")
                block = child[len(enc_name) + 1 :] if enc_name else child
                stage = _STAGE_OF_CHILD.get(block.split(".")[0], "stage3")
        elif len(stack) > 1:
            child = self._names.get(id(stack[1][0]), "")
            block = child
            top = child.split(".")[0]
            stage = _STAGE_OF_ROOT_CHILD.get(top, "head") if self._root_is_model else "neck"
        elif stack and not self._root_is_model:
            stage, block = "neck", "(root)"
        role, tokens = "other", None
        if stack and _is_norm(stack[-1][0]):
            role = "norm"
        else:
            for module, ntok in reversed(stack):
                if isinstance(module, self._attn_types):
                    role, tokens = "attention", ntok
                    break
                if type(module).__name__ == "RelativePositionBias":
                    role = "rel_pos"
                    break
                if _is_mlp(module):
                    role = "mlp"
                    break
            if role == "other" and any(_is_conv_part(m) for m, _ in stack):
                role = "conv"
        return stage, block, role, tokens

    @staticmethod
    def _kind(t: torch.Tensor, role: str, tokens: Optional[int], origin: Optional[str]) -> str:
        if origin == "AccumulateGrad":
            return "weight_cast"
        if role == "attention":
            if origin in _SOFTMAX_NODES:
                return "attn_matrix"
            shape = t.shape
            square = (
                tokens is not None
                and t.dim() >= 3
                and shape[-2] == tokens
                and tokens <= shape[-1] < tokens + _MEM_EFF_MASK_ALIGN
            )
            if square and (origin is None or origin in _BIAS_NODES):
                return "rel_pos"
            if origin in _INDEX_NODES or not t.is_floating_point():
                return "rel_pos"
            return "attn_io"
        return role if role in ("norm", "mlp", "conv", "rel_pos") else "other"

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        addr = storage._cdata
        if addr in self._params or t.device.type == "meta":
            return t if self.keep else None
        kind = "checkpoint_input" if _in_checkpoint_save() else None
        stage, block, role, tokens = self._context()
        if kind is None:
            kind = self._kind(t, role, tokens, _origin(t))
        # the same storage as an earlier save, unless that one died and the address was reused
        key = self._current.get(addr)
        alive = self._alive.get(addr)
        if key is not None and (self.keep or not alive.expired()):
            self.records[key]["kinds"].add(kind)
        else:
            nbytes = storage.nbytes()
            if (
                self.fake
                and role == "norm"
                and t.grad_fn is None
                and t.dtype in (torch.bfloat16, torch.float16)
                and t.dim() > 0
                and t.shape[-1] == 1
            ):
                nbytes = nbytes * 4 // t.element_size()  # real kernels keep float32 statistics
            key = len(self.records)
            self._current[addr] = key
            self.records[key] = {
                "bytes": nbytes,
                "stage": stage,
                "block": block,
                "kinds": {kind},
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
            }
        self._alive[addr] = storage if self.keep else StorageWeakRef(storage)
        return t if self.keep else None

    def __enter__(self) -> "SavedTensorCensus":
        for m in self.model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._alive.clear()
        self._current.clear()

    # ---------------------------------------------------------------- result
    def result(self, batch_size: int = 1) -> Dict[str, Any]:
        """Totals in bytes (not per image): ``total_bytes``, ``by_stage``, ``by_kind``,
        ``by_stage_kind``, ``by_block`` (block -> kind -> bytes), ``largest`` (the 12 largest
        storages), ``num_storages``; ``bytes_per_img`` = total / ``batch_size``."""
        by_stage: Dict[str, int] = {}
        by_kind: Dict[str, int] = {}
        by_stage_kind: Dict[str, Dict[str, int]] = {}
        by_block: Dict[str, Dict[str, int]] = {}
        rows = []
        for rec in self.records.values():
            kind = next(k for k in KIND_PRIORITY if k in rec["kinds"])
            n, stage, block = rec["bytes"], rec["stage"], rec["block"]
            by_stage[stage] = by_stage.get(stage, 0) + n
            by_kind[kind] = by_kind.get(kind, 0) + n
            sk = by_stage_kind.setdefault(stage, {})
            sk[kind] = sk.get(kind, 0) + n
            bk = by_block.setdefault(f"{stage}/{block}", {})
            bk[kind] = bk.get(kind, 0) + n
            rows.append(dict(rec, kind=kind, kinds=sorted(rec["kinds"])))
        total = sum(by_stage.values())
        rows.sort(key=lambda r: -r["bytes"])
        order = {s: i for i, s in enumerate(STAGES)}
        return {
            "total_bytes": total,
            "bytes_per_img": total / batch_size,
            "batch_size": batch_size,
            "num_storages": len(rows),
            "by_stage": dict(sorted(by_stage.items(), key=lambda kv: order.get(kv[0], 99))),
            "by_kind": {k: by_kind[k] for k in KINDS if k in by_kind},
            "by_stage_kind": {
                s: {k: v[k] for k in KINDS if k in v}
                for s, v in sorted(by_stage_kind.items(), key=lambda kv: order.get(kv[0], 99))
            },
            "by_block": by_block,
            "largest": rows[:12],
        }


def _unpack(packed: Any) -> Any:
    if packed is None:
        raise RuntimeError(
            "SavedTensorCensus(keep=False) dropped the saved tensors; a backward cannot run"
        )
    return packed


# ------------------------------------------------------------------------------ the CUDA path
class _MemoryEfficientAttention(torch.autograd.Function):
    """SDPA that keeps for backward what PyTorch's CUDA memory-efficient kernel keeps (see the
    module docstring); forward and backward are computed explicitly in float32."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):  # type: ignore[override]
        b, h, n, d = q.shape
        s = k.shape[-2]
        scale = d**-0.5 if scale is None else scale
        kept = None
        if mask is not None:
            full = mask.expand(b, h, n, s)
            if s % _MEM_EFF_MASK_ALIGN:
                pad = _MEM_EFF_MASK_ALIGN - s % _MEM_EFF_MASK_ALIGN
                kept = F.pad(full, (0, pad))[..., :s]
            elif any(full.stride(i) % _MEM_EFF_MASK_ALIGN for i in range(3)):
                kept = full.contiguous()
            else:
                kept = full
        with torch.autocast("cpu", enabled=False):
            logits = (q.float() * scale) @ k.float().transpose(-2, -1)
            if kept is not None:
                logits = logits + kept.float()
            lse = torch.logsumexp(logits, dim=-1)
            out = torch.exp(logits - lse.unsqueeze(-1)) @ v.float()
        # the kernel writes (B, N, heads, d) and returns the transposed view
        out = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        rows = -(-n // _MEM_EFF_LSE_ALIGN) * _MEM_EFF_LSE_ALIGN
        lse_kept = lse.new_zeros(b, h, rows)
        lse_kept[..., :n] = lse
        ctx.scale = scale
        ctx.mask_shape = None if mask is None else mask.shape
        ctx.mask_dtype = None if mask is None else mask.dtype
        ctx.save_for_backward(q, k, v, kept, out, lse_kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, kept, _out, _lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            leaves = [
                None if t is None else t.detach().float().requires_grad_(bool(need[i]))
                for i, t in enumerate((q, k, v, kept))
            ]
            qf, kf, vf, mf = leaves
            logits = (qf * ctx.scale) @ kf.transpose(-2, -1)
            if mf is not None:
                logits = logits + mf
            out = logits.softmax(dim=-1) @ vf
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out.float()) if wanted else ())
        result: List[Optional[torch.Tensor]] = []
        for i, (t, src) in enumerate(zip(leaves, (q, k, v, kept))):
            if t is None or not t.requires_grad:
                result.append(None)
                continue
            g = next(grads)
            if i == 3:
                g = g.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
            else:
                g = g.to(src.dtype)
            result.append(g)
        return (*result, None)


def _sdpa_memory_efficient(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    boolean_mask = attn_mask is not None and attn_mask.dtype == torch.bool
    if dropout_p or is_causal or enable_gqa or boolean_mask:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    if torch.is_autocast_enabled("cpu"):  # SDPA is on autocast's lower-precision list
        low = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(low) for t in (query, key, value))
        attn_mask = attn_mask.to(low) if attn_mask is not None else None
    return _MemoryEfficientAttention.apply(query, key, value, attn_mask, scale)


# ops that CUDA autocast runs in float32 (torch.amp docs); the ones relevant for saved memory
_CUDA_FP32_OPS = (
    "layer_norm",
    "group_norm",
    "softmax",
    "log_softmax",
    "softmin",
    "exp",
    "expm1",
    "log",
    "log1p",
    "log2",
    "log10",
    "pow",
    "__pow__",
    "__rpow__",
    "__rtruediv__",
    "rsqrt",
    "reciprocal",
    "sum",
    "prod",
    "cumsum",
    "cumprod",
    "logsumexp",
    "norm",
    "normalize",
    "softplus",
    "acos",
    "asin",
    "cosh",
    "sinh",
    "tan",
    "erfinv",
    "cdist",
    "dist",
    "pdist",
    "renorm",
    "cosine_similarity",
    "cross_entropy",
    "nll_loss",
    "binary_cross_entropy_with_logits",
    "smooth_l1_loss",
    "l1_loss",
    "mse_loss",
    "huber_loss",
    "kl_div",
)


def _run_backward(func: Any, tensors: Any, *args: Any, **kwargs: Any) -> None:
    """``Tensor.backward`` / ``torch.autograd.backward`` without torch-function dispatch."""
    from torch.autograd.graph import _engine_run_backward

    names = ("grad", "retain_graph", "create_graph")
    if func is torch.autograd.backward:
        kwargs = {("grad" if k == "grad_tensors" else k): v for k, v in kwargs.items()}
    else:
        kwargs = {("grad" if k == "gradient" else k): v for k, v in kwargs.items()}
    kwargs.update(zip(names, args))
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = kwargs.get("grad")
    grads = (grads,) if grads is None or isinstance(grads, torch.Tensor) else tuple(grads)
    if len(grads) == 1 and len(tensors) > 1:
        grads = grads * len(tensors)
    grads = tuple(torch.ones_like(t) if g is None else g for t, g in zip(tensors, grads))
    create_graph = bool(kwargs.get("create_graph") or False)
    retain_graph = kwargs.get("retain_graph")
    retain_graph = create_graph if retain_graph is None else retain_graph
    inputs = kwargs.get("inputs")
    inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    _engine_run_backward(
        tensors,
        grads,
        retain_graph,
        create_graph,
        tuple(inputs),
        allow_unreachable=True,
        accumulate_grad=True,
    )


def _cuda_fp32_functions() -> frozenset:
    out = set()
    for name in _CUDA_FP32_OPS:
        for namespace in (torch, torch.Tensor, F):
            fn = getattr(namespace, name, None)
            if fn is not None:
                out.add(fn)
    return frozenset(out)


class _CudaPathMode(TorchFunctionMode):
    """Runs SDPA as the CUDA memory-efficient kernel keeps it and CUDA autocast's float32 ops in
    float32 (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.fp32 = _cuda_fp32_functions()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _sdpa_memory_efficient(*args, **kwargs)
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # a handler runs with its mode switched off; keep it on for the backward, where
            # checkpointed regions run their forward again (the engine is called directly, since
            # both backward functions would come back to this handler)
            with self:
                _run_backward(func, *args, **kwargs)
            return None
        if func in self.fp32 and "dtype" not in kwargs and torch.is_autocast_enabled("cpu"):

            def up(a: Any) -> Any:
                if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16):
                    return a.float()
                return a

            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_path_emulation() -> Iterator[None]:
    """Inside, SDPA keeps what the CUDA memory-efficient kernel keeps and CUDA autocast's float32
    op list runs in float32 (the ConvViT attention modules must be switched to SDPA separately,
    see :func:`memory_breakdown`)."""
    with _CudaPathMode():
        yield


# ------------------------------------------------------------------------------ fake models
def fake_model(model: nn.Module, mode: Any) -> nn.Module:
    """Replace every parameter and buffer of ``model`` (in place) by a fake tensor of ``mode``
    (a ``FakeTensorMode``) with the same shape, strides, dtype and ``requires_grad``."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(
                    mode.from_tensor(p), requires_grad=p.requires_grad
                )
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)
    return model


# ------------------------------------------------------------------------------ breakdowns
def _forward_fn(model: nn.Module, cfg: Any, paths: FastPaths) -> Callable[[], Any]:
    """One training forward of ``cfg.mode`` (backbone_train / train) returning the loss."""
    b, (h, w) = cfg.batch_size, cfg.resolved_size
    fmt = torch.channels_last if paths.channels_last else torch.contiguous_format
    if cfg.mode == "backbone_train":
        x = torch.randn(b, 3, h, w).contiguous(memory_format=fmt)

        def forward() -> Any:
            with autocast("cpu", paths.dtype):
                return _scalar_from(model(x))

        return forward
    if cfg.mode != "train":
        raise BenchmarkSetupError(
            f"memory breakdown: mode {cfg.mode!r}; expected 'backbone_train' or 'train'"
        )
    from detectron2.utils.events import EventStorage

    seg_head = getattr(model, "sem_seg_head", None)
    batch = synthetic_detection_batch(
        b,
        (h, w),
        num_instances=cfg.num_instances,
        num_classes=getattr(getattr(model, "roi_heads", None), "num_classes", 80),
        mask_format=cfg.mask_format,
        with_instances=seg_head is None,
        sem_seg_classes=seg_head.num_classes if seg_head is not None else None,
        ignore_value=getattr(seg_head, "ignore_value", 255),
    )

    def forward() -> Any:
        with EventStorage(0), autocast("cpu", paths.dtype):
            losses = model(batch)
        return sum(v.float() for v in losses.values())

    return forward


def _check_cfg(cfg: Any) -> None:
    if torch.device(cfg.device).type != "cpu":
        raise BenchmarkSetupError(
            "memory breakdown runs on the CPU (the CUDA path is emulated there); use --device cpu"
        )
    if cfg.mode not in ("backbone_train", "train"):
        raise BenchmarkSetupError(
            f"memory breakdown: mode {cfg.mode!r}; expected 'backbone_train' or 'train'"
        )


def _prepare(cfg: Any, fake: Optional[bool], model: Optional[nn.Module]):
    """(model, fake mode context or None). ``fake`` None: fake for backbone_train."""
    from .runner import build_subject

    _check_cfg(cfg)
    if fake is None:
        fake = cfg.mode == "backbone_train"
    torch.manual_seed(cfg.seed)
    model = model if model is not None else build_subject(cfg)
    model.train()
    # channels-last is set once here (fake parameters cannot be converted later); attention kernel
    # and checkpointing are switched per measurement by _switch
    apply_fast_paths(model, replace(cfg.paths, compile=False), device="cpu", training=True)
    if not fake:
        return model, None
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake_model(model, mode)
    return model, mode


def _attn_label(model: nn.Module) -> str:
    from ..modeling.convvit import Attention

    attn = [m for m in model.modules() if isinstance(m, Attention)]
    if not attn:
        return "other (no ConvViT attention)"
    fused = sum(m.fused for m in attn)
    return "sdpa" if fused == len(attn) else "explicit" if fused == 0 else "mixed"


def _switch(model: nn.Module, paths: FastPaths, path: str) -> None:
    """Attention kernel (as resolved on the path's device) and checkpointing of ``paths``."""
    device = "cuda" if path == "cuda" else "cpu"
    set_fused_attn(model, resolve_attn(model, paths.attn, device=device, training=True))
    set_act_checkpoint(model, paths.act_checkpoint)


def _measure(
    model: nn.Module, cfg: Any, paths: FastPaths, path: str, fake_mode: Any, keep: bool = False
) -> Dict[str, Any]:
    if path not in MEMORY_PATHS:
        raise BenchmarkSetupError(f"memory path {path!r}; expected one of {MEMORY_PATHS}")
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with ctx:
        _switch(model, paths, path)
        attn = _attn_label(model)
        forward = _forward_fn(model, cfg, paths)
        emulation = cuda_path_emulation() if path == "cuda" else contextlib.nullcontext()
        with emulation, SavedTensorCensus(model, keep=keep, fake=fake_mode is not None) as census:
            loss = forward()
        del loss
    out = census.result(cfg.batch_size)
    out.update(
        path=path,
        attention=attn,
        fake_tensors=fake_mode is not None,
        act_checkpoint=list(paths.act_checkpoint),
    )
    return out


def _meta(cfg: Any) -> Dict[str, Any]:
    return {
        "name": cfg.name,
        "config_file": cfg.config_file,
        "preset": cfg.preset,
        "mode": cfg.mode,
        "batch_size": cfg.batch_size,
        "image_size": list(cfg.resolved_size),
        "fast_paths": cfg.paths.to_dict(),
        "torch_version": torch.__version__,
    }


def memory_breakdown(
    cfg: Any,
    *,
    path: str = "cpu",
    fake: Optional[bool] = None,
    model: Optional[nn.Module] = None,
    keep: bool = False,
) -> Dict[str, Any]:
    """Saved-activation breakdown of one training forward of ``cfg`` (a ``BenchmarkConfig`` with
    mode ``backbone_train`` or ``train``, device cpu) on ``path`` "cpu" or "cuda".

    ``fake``: run on fake tensors (default: for ``backbone_train``); ``model``: use this module
    instead of building the subject (with ``fake`` its parameters are replaced); ``keep``: let
    autograd keep the tensors (only needed to compare with a real step). Returns the census result
    (:meth:`SavedTensorCensus.result`) plus ``path``, ``attention`` (the kernel the ConvViT
    attention took), ``fake_tensors``, ``act_checkpoint`` and the config's description."""
    model, fake_mode = _prepare(cfg, fake, model)
    out = _measure(model, cfg, cfg.paths, path, fake_mode, keep=keep)
    out.update(_meta(cfg))
    return out


def checkpoint_sweep(
    cfg: Any,
    policies: Sequence[Sequence[Any]] = DEFAULT_SWEEP,
    *,
    fake: Optional[bool] = None,
    flops: bool = True,
) -> Dict[str, Any]:
    """Saved bytes per image on both paths and the recomputation FLOPs of each ``act_checkpoint``
    policy (mode ``backbone_train``).

    Extra FLOPs are measured, not estimated: FLOPs of one forward + backward step
    (``count_flops``) with the policy minus without it, on each path (on the CUDA path an SDPA
    call that is recomputed costs its whole forward, on the explicit path non-reentrant
    checkpointing stops after the softmax). ``*_extra_flops_pct`` divides by the model FLOPs of
    the step (CPU path, no checkpointing). Returns ``{"rows": [...], **config}``; a model without
    ConvViT encoders (e.g. detectron2's ViT) gets the single policy ()."""
    if cfg.mode != "backbone_train":
        raise BenchmarkSetupError("checkpoint_sweep: use mode 'backbone_train'")
    model, fake_mode = _prepare(cfg, fake, None)
    if not find_convvit_encoders(model):
        policies = [()]
    policies = [()] + [tuple(p) for p in policies if tuple(p)]
    rows = []
    base: Dict[str, float] = {}
    for policy in policies:
        paths = replace(cfg.paths, act_checkpoint=tuple(policy))
        row: Dict[str, Any] = {"act_checkpoint": list(paths.act_checkpoint)}
        for path in MEMORY_PATHS:
            res = _measure(model, cfg, paths, path, fake_mode)
            row[f"{path}_bytes_per_img"] = res["bytes_per_img"]
            row[f"{path}_by_stage"] = {k: v / cfg.batch_size for k, v in res["by_stage"].items()}
            row[f"{path}_by_kind"] = {k: v / cfg.batch_size for k, v in res["by_kind"].items()}
            if flops:
                total = _step_flops(model, cfg, paths, fake_mode, path) / cfg.batch_size
                base.setdefault(path, total)
                row[f"{path}_flops_per_img"] = total
                row[f"{path}_extra_flops_per_img"] = total - base[path]
        if flops:
            row["flops_per_img"] = base["cpu"]
            for path in MEMORY_PATHS:
                row[f"{path}_extra_flops_pct"] = (
                    100.0 * row[f"{path}_extra_flops_per_img"] / base["cpu"]
                )
        rows.append(row)
    out = _meta(cfg)
    out["rows"] = rows
    return out


def _step_flops(model: nn.Module, cfg: Any, paths: FastPaths, fake_mode: Any, path: str) -> int:
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with ctx:
        _switch(model, paths, path)
        step, _ = make_step(
            model,
            "backbone_train",
            batch_size=cfg.batch_size,
            image_size=cfg.resolved_size,
            paths=paths,
            device=torch.device("cpu"),
        )
        with cuda_path_emulation() if path == "cuda" else contextlib.nullcontext():
            total, _ = count_flops(step)
    return total


# ------------------------------------------------------------------------------ tables
def _gib(n: Optional[float]) -> str:
    if n is None or n == 0:
        return "-"
    return f"{n / 2**30:.2f}" if n >= 2**30 / 100 else f"{n / 2**20:.1f} MiB"


def format_breakdown_table(result: Dict[str, Any]) -> str:
    """Markdown table of one :func:`memory_breakdown` result, GiB per image (MiB below 0.01 GiB):
    rows are stages, columns kinds (only those present), plus totals."""
    b = result["batch_size"]
    kinds = [k for k in KINDS if k in result["by_kind"]]
    lines = [
        "| stage | " + " | ".join(kinds) + " | total |",
        "|---|" + "---|" * (len(kinds) + 1),
    ]
    for stage, per_kind in result["by_stage_kind"].items():
        cells = [_gib(per_kind.get(k, 0) / b) for k in kinds]
        stage_total = _gib(result["by_stage"][stage] / b)
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {stage_total} |")
    cells = [_gib(result["by_kind"][k] / b) for k in kinds]
    lines.append("| **total** | " + " | ".join(cells) + f" | **{_gib(result['bytes_per_img'])}** |")
    return "\n".join(lines)


def format_sweep_table(sweep: Dict[str, Any]) -> str:
    """Markdown table of :func:`checkpoint_sweep`: GiB per image and extra FLOPs on both paths."""
    lines = [
        "| act_checkpoint | CPU path GiB/img | extra FLOPs (CPU path) | CUDA path GiB/img "
        "| extra FLOPs (CUDA path) |",
        "|---|---|---|---|---|",
    ]

    def extra(row: Dict[str, Any], path: str) -> str:
        if f"{path}_extra_flops_per_img" not in row:
            return "-"
        gflop = row[f"{path}_extra_flops_per_img"] / 1e9
        return f"+{gflop:.1f} GFLOP (+{row[f'{path}_extra_flops_pct']:.1f}%)"

    for row in sweep["rows"]:
        policy = ",".join(map(str, row["act_checkpoint"])) or "none"
        lines.append(
            f"| {policy} | {_gib(row['cpu_bytes_per_img'])} | {extra(row, 'cpu')} "
            f"| {_gib(row['cuda_bytes_per_img'])} | {extra(row, 'cuda')} |"
        )
    if sweep["rows"] and "flops_per_img" in sweep["rows"][0]:
        lines.append(
            f"\nModel FLOPs of the step (forward + backward, no recomputation): "
            f"{sweep['rows'][0]['flops_per_img'] / 1e9:.1f} GFLOP/img."
        )
    return "\n".join(lines)
