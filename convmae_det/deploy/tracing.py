"""Make the ConvViT / ViT models trace to graphs that accept other input sizes.

``torch.jit.trace`` (and the TorchScript-based ``torch.onnx`` exporter) records tensor ops only.
Sizes read from a tensor under tracing are 0-dim tensors, so shape *arithmetic* follows the input,
but every Python ``if`` on a size is taken once, at the traced size, and frozen into the graph.
These are the places in the models of this project where that happens:

================================================  ===============================================
function (module)                                 frozen branch
================================================  ===============================================
``pad_to_divisible`` (det_backbone)               skip the pad when nothing is missing
``window_padding_bias`` (det_backbone)            no mask when the grid fills whole windows
``window_partition`` / ``window_unpartition``     pad / crop only when the grid is not a
(convvit, detectron2 ViT)                         multiple of the window
``resize_pos_embed`` (convvit)                    no resize when the grid equals the table
``table_rel_pos_bias`` (convvit, position)        resize the BEiT table only for larger grids
``get_rel_pos`` (position, detectron2 utils)      resize the decomposed table only on a mismatch
``get_abs_pos`` (detectron2 ViT)                  no resize when the grid equals the table
``_resize`` (upernet)                             no resize when the sizes already agree
================================================  ===============================================

:func:`traceable_shapes` replaces them, for the duration of a trace, by versions that always take
the general branch with tensor-valued sizes: an absent pad is a pad by 0, a resize to the same size
is the identity (bicubic and linear weights are exactly (0, 1, 0, 0) there), a padding mask of a
full grid is all zeros. They call the original function whenever the sizes are plain Python ints
(window sizes, eager calls), so eager results never change. :func:`onnx_adaptive_pooling` swaps
``nn.AdaptiveAvgPool2d`` (whose ONNX export needs a fixed input size divisible by the output size)
for an equivalent made of tensor ops.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["traceable_shapes", "onnx_adaptive_pooling", "TracedAdaptiveAvgPool2d", "PATCHED"]

Size = Any  # a Python int, or a 0-dim integer tensor under tracing


def _static(*sizes: Size) -> bool:
    """True when every size is a plain int (nothing to keep dynamic)."""
    return all(isinstance(s, int) for s in sizes)


def _make_pad_to_divisible(orig: Callable) -> Callable:
    def pad_to_divisible(x: torch.Tensor, divisor: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        if divisor <= 1 or _static(h, w):
            return orig(x, divisor)
        return F.pad(x, (0, (-w) % divisor, 0, (-h) % divisor))

    return pad_to_divisible


def _make_window_padding_bias(orig: Callable) -> Callable:
    def window_padding_bias(
        batch: Size,
        hw: Tuple[Size, Size],
        window_size: int,
        *,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Optional[torch.Tensor]:
        h, w = hw
        if _static(h, w):
            return orig(batch, hw, window_size, device=device, dtype=dtype)
        ws = window_size
        hp, wp = h + (-h) % ws, w + (-w) % ws
        rows = torch.arange(hp, device=device) < h
        cols = torch.arange(wp, device=device) < w
        valid = rows[:, None] & cols[None, :]
        valid = valid.reshape(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        bias = torch.zeros(valid.shape, dtype=dtype, device=device)
        bias = bias.masked_fill(~valid, float("-inf"))  # all zeros when the grid is full
        return bias[:, None, None, :].repeat(batch, 1, 1, 1)

    return window_padding_bias


def _make_window_partition(orig: Callable) -> Callable:
    def window_partition(x: torch.Tensor, window_size: int):
        b, h, w, c = x.shape
        if _static(h, w):
            return orig(x, window_size)
        ws = window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        x = x.reshape(b, hp // ws, ws, wp // ws, ws, c)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c), (hp, wp)

    return window_partition


def _make_window_unpartition(orig: Callable) -> Callable:
    def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw, hw) -> torch.Tensor:
        (hp, wp), (h, w) = pad_hw, hw
        if _static(hp, wp, h, w):
            return orig(windows, window_size, pad_hw, hw)
        ws = window_size
        b = windows.shape[0] // ((hp // ws) * (wp // ws))
        x = windows.reshape(b, hp // ws, wp // ws, ws, ws, -1)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
        return x[:, :h, :w, :].contiguous()

    return window_unpartition


def _make_resize_pos_embed(orig: Callable) -> Callable:
    def resize_pos_embed(pos_embed: torch.Tensor, src_hw, dst_hw) -> torch.Tensor:
        if _static(*dst_hw):
            return orig(pos_embed, src_hw, dst_hw)
        c = pos_embed.shape[-1]
        grid = pos_embed.reshape(1, src_hw[0], src_hw[1], c).permute(0, 3, 1, 2)
        work = torch.promote_types(pos_embed.dtype, torch.float32)
        # the identity when dst_hw == src_hw: bicubic weights are (0, 1, 0, 0) there
        grid = F.interpolate(grid.to(work), size=dst_hw, mode="bicubic", align_corners=False)
        return grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, c)

    return resize_pos_embed


def _make_table_rel_pos_bias(orig: Callable) -> Callable:
    from ..modeling.position import relative_position_index

    def table_rel_pos_bias(table: torch.Tensor, table_hw, hw) -> torch.Tensor:
        h, w = hw
        if _static(h, w):
            return orig(table, table_hw, hw)
        th, tw = table_hw
        # eager: the table is resized to ``hw`` when the grid is larger in either axis
        larger = (h > th) | (w > tw)
        dst_h = torch.where(larger, h, torch.full_like(h, th))
        dst_w = torch.where(larger, w, torch.full_like(w, tw))
        heads = table.shape[-1]
        src = table.reshape(2 * th - 1, 2 * tw - 1, heads).permute(2, 0, 1)[None]
        work = torch.promote_types(table.dtype, torch.float32)
        resized = F.interpolate(
            src.to(work), size=(2 * dst_h - 1, 2 * dst_w - 1), mode="bicubic", align_corners=False
        )
        resized = resized[0].permute(1, 2, 0).reshape(-1, heads).to(table.dtype)
        index = relative_position_index((h, w), (dst_h, dst_w), device=table.device)
        n = h * w
        return resized[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    return table_rel_pos_bias


def _make_get_rel_pos(orig: Callable) -> Callable:
    def get_rel_pos(q_size: Size, k_size: Size, rel_pos: torch.Tensor) -> torch.Tensor:
        if _static(q_size, k_size):
            return orig(q_size, k_size, rel_pos)
        q_size, k_size = torch.as_tensor(q_size), torch.as_tensor(k_size)
        dist = 2 * torch.maximum(q_size, k_size) - 1
        # the identity when the table already has ``dist`` rows (linear weights (1, 0))
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=dist, mode="linear"
        )
        resized = resized.reshape(-1, dist).permute(1, 0)
        q_scale = torch.clamp(k_size / q_size, min=1.0)
        k_scale = torch.clamp(q_size / k_size, min=1.0)
        q_coords = torch.arange(q_size)[:, None] * q_scale
        k_coords = torch.arange(k_size)[None, :] * k_scale
        coords = (q_coords - k_coords) + (k_size - 1) * k_scale
        return resized[coords.long()]

    return get_rel_pos


def _make_get_abs_pos(orig: Callable) -> Callable:
    def get_abs_pos(abs_pos: torch.Tensor, has_cls_token: bool, hw) -> torch.Tensor:
        h, w = hw
        if _static(h, w):
            return orig(abs_pos, has_cls_token, hw)
        if has_cls_token:
            abs_pos = abs_pos[:, 1:]
        side = math.isqrt(int(abs_pos.shape[1]))  # the stored table: a constant size
        grid = abs_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)

    return get_abs_pos


def _make_resize(orig: Callable) -> Callable:
    def _resize(x: torch.Tensor, size) -> torch.Tensor:
        if _static(*size) and _static(*x.shape[-2:]):
            return orig(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return _resize


# (module, attribute, factory of the trace-safe version)
_PATCHES: List[Tuple[str, str, Callable[[Callable], Callable]]] = [
    ("convmae_det.modeling.det_backbone", "pad_to_divisible", _make_pad_to_divisible),
    ("convmae_det.modeling.det_backbone", "window_padding_bias", _make_window_padding_bias),
    ("convmae_det.modeling.convvit", "window_partition", _make_window_partition),
    ("convmae_det.modeling.convvit", "window_unpartition", _make_window_unpartition),
    ("convmae_det.modeling.convvit", "resize_pos_embed", _make_resize_pos_embed),
    ("convmae_det.modeling.convvit", "table_rel_pos_bias", _make_table_rel_pos_bias),
    ("convmae_det.modeling.position", "table_rel_pos_bias", _make_table_rel_pos_bias),
    ("convmae_det.modeling.position", "get_rel_pos", _make_get_rel_pos),
    ("convmae_det.modeling.upernet", "_resize", _make_resize),
    ("detectron2.modeling.backbone.utils", "get_rel_pos", _make_get_rel_pos),
    ("detectron2.modeling.backbone.vit", "get_abs_pos", _make_get_abs_pos),
    ("detectron2.modeling.backbone.vit", "window_partition", _make_window_partition),
    ("detectron2.modeling.backbone.vit", "window_unpartition", _make_window_unpartition),
]
PATCHED: Tuple[str, ...] = tuple(f"{m}.{a}" for m, a, _ in _PATCHES)
"""The functions :func:`traceable_shapes` replaces while it is active."""


@contextlib.contextmanager
def traceable_shapes() -> Iterator[None]:
    """Within the block, the functions of :data:`PATCHED` keep tensor-valued sizes dynamic.

    Raises:
        RuntimeError: a patched function is gone (the model code changed; update this table).
    """
    saved: List[Tuple[Any, str, Callable]] = []
    try:
        for module_name, attr, factory in _PATCHES:
            module = importlib.import_module(module_name)
            orig = getattr(module, attr, None)
            if orig is None:
                raise RuntimeError(
                    f"convmae_det.deploy.tracing: {module_name}.{attr} no longer exists; the "
                    "export's table of size-dependent functions needs updating"
                )
            saved.append((module, attr, orig))
            setattr(module, attr, factory(orig))
        yield
    finally:
        for module, attr, orig in reversed(saved):
            setattr(module, attr, orig)


class TracedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(output_size)`` written with tensor ops, for any input size.

    Bin ``i`` of ``o`` over ``n`` inputs averages ``[floor(i n / o), ceil((i + 1) n / o))``, as
    PyTorch does; the sums are two matrix products (same values up to summation order, ~1e-7).
    """

    def __init__(self, output_size: Tuple[int, int]):
        super().__init__()
        self.output_size = output_size

    @staticmethod
    def _bins(n: torch.Tensor, o: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(o)
        start = torch.div(i * n, o, rounding_mode="floor")
        end = torch.div((i + 1) * n + o - 1, o, rounding_mode="floor")
        j = torch.arange(n)
        member = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
        return member.to(dtype), (end - start).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh, ow = self.output_size
        rows, nh = self._bins(torch.as_tensor(h), oh, x.dtype)
        cols, nw = self._bins(torch.as_tensor(w), ow, x.dtype)
        sums = torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))
        return sums / (nh[:, None] * nw[None, :])


def _pair(size: Any) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@contextlib.contextmanager
def onnx_adaptive_pooling(model: nn.Module) -> Iterator[int]:
    """Within the block, every ``nn.AdaptiveAvgPool2d`` of ``model`` with an output larger than
    1x1 is a :class:`TracedAdaptiveAvgPool2d`; yields how many were swapped."""
    swapped: List[Tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d) and _pair(child.output_size) != (1, 1):
                size = _pair(child.output_size)
                if any(s is None for s in size):
                    continue
                setattr(parent, name, TracedAdaptiveAvgPool2d(size))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
