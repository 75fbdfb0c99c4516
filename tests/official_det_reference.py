"""Independent re-implementations of the two official ConvMAE detector trunks, for tests.

Written from the published behaviour with explicit tensor operations only (matmul attention,
reshape/permute window partitions, own relative-position indexing), reading weights from a
plain state dict with the official key names. Nothing here imports convmae_det.

* :func:`paper_trunk_forward`: Alpha-VL ConvMAE ``DET/models/convmae.py`` ``ConvViTDet.forward``:
  the token grid must equal the stored pos_embed grid (official: exactly 1024 input); blocks3
  alternate global / windowed attention with two shared BEiT tables; outputs s0..s3.
* :func:`vitdet_trunk_forward`: Official-ConvMAE-Det ``ConvViT.forward``: pos_embed 14x14 resized
  bicubically to the grid, windows zero-padded, decomposed rel-pos (linearly interpolated),
  output ``last_feat``.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
SD = Dict[str, Tensor]


def _ln_channels(x: Tensor, sd: SD, key: str, eps: float) -> Tensor:
    """LayerNorm over the channels of an NCHW map."""
    y = x.permute(0, 2, 3, 1)
    y = F.layer_norm(y, y.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)
    return y.permute(0, 3, 1, 2)


def _ln(x: Tensor, sd: SD, key: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _linear(x: Tensor, sd: SD, key: str) -> Tensor:
    return x @ sd[key + ".weight"].t() + sd[key + ".bias"]


def _patch_embed(x: Tensor, sd: SD, key: str, patch: int) -> Tensor:
    x = F.conv2d(x, sd[key + ".proj.weight"], sd[key + ".proj.bias"], stride=patch)
    return F.gelu(_ln_channels(x, sd, key + ".norm", 1e-5))


def _conv_block(x: Tensor, sd: SD, key: str, eps: float) -> Tensor:
    c = x.shape[1]
    y = F.conv2d(_ln_channels(x, sd, key + ".norm1", eps), sd[key + ".conv1.weight"],
                 sd[key + ".conv1.bias"])  # fmt: skip
    y = F.conv2d(y, sd[key + ".attn.weight"], sd[key + ".attn.bias"], padding=2, groups=c)
    x = x + F.conv2d(y, sd[key + ".conv2.weight"], sd[key + ".conv2.bias"])
    y = _ln_channels(x, sd, key + ".norm2", eps)
    y = F.conv2d(y, sd[key + ".mlp.fc1.weight"], sd[key + ".mlp.fc1.bias"])
    y = F.conv2d(F.gelu(y), sd[key + ".mlp.fc2.weight"], sd[key + ".mlp.fc2.bias"])
    return x + y


def _conv_stages(x: Tensor, sd: SD, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    x = _patch_embed(x, sd, "patch_embed1", 4)
    i = 0
    while f"blocks1.{i}.conv1.weight" in sd:
        x = _conv_block(x, sd, f"blocks1.{i}", eps)
        i += 1
    s0 = x
    x = _patch_embed(x, sd, "patch_embed2", 2)
    i = 0
    while f"blocks2.{i}.conv1.weight" in sd:
        x = _conv_block(x, sd, f"blocks2.{i}", eps)
        i += 1
    s1 = x
    x = _patch_embed(x, sd, "patch_embed3", 2)  # (B, C, h, w)
    x = _linear(x.flatten(2).transpose(1, 2), sd, "patch_embed4")  # (B, h*w, C)
    return s0, s1, x


def _attention(x: Tensor, sd: SD, key: str, heads: int, bias_fn=None) -> Tensor:
    """x (B, N, C); bias_fn(q) -> additive logits term (B or 1, heads, N, N) or None."""
    b, n, c = x.shape
    qkv = _linear(x, sd, key + ".qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    if bias_fn is not None:
        attn = attn + bias_fn(q)
    return _linear((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c), sd, key + ".proj")


def _mlp(x: Tensor, sd: SD, key: str) -> Tensor:
    return _linear(F.gelu(_linear(x, sd, key + ".fc1")), sd, key + ".fc2")


def _block(x: Tensor, sd: SD, key: str, heads: int, attend) -> Tensor:
    """Pre-norm block on tokens (B, N, C); ``attend`` maps the normed tokens to attention out."""
    x = x + attend(_ln(x, sd, key + ".norm1", 1e-6))
    return x + _mlp(_ln(x, sd, key + ".norm2", 1e-6), sd, key + ".mlp")


# ------------------------------------------------------------------ paper (BEiT shared tables)
def beit_index(h: int, w: int) -> Tensor:
    """(h*w, h*w) index into a ((2h-1)*(2w-1)) table, the BEiT construction."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def _beit_bias(table: Tensor, h: int, w: int) -> Tensor:
    n = h * w
    return table[beit_index(h, w).reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)[None]


def _to_windows(x: Tensor, h: int, w: int, ws: int) -> Tensor:
    """(B, h*w, C) -> (B*nh*nw, ws*ws, C), "b (h h1) (w w1) c -> (b h w) (h1 w1) c"."""
    b, _, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _from_windows(x: Tensor, b: int, h: int, w: int, ws: int) -> Tensor:
    """Inverse of :func:`_to_windows`: "(b h w) (h1 w1) c -> b (h h1 w w1) c"."""
    c = x.shape[-1]
    x = x.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)


def paper_trunk_forward(
    x: Tensor, sd: SD, *, heads: int, window_size: int, global_blocks: Sequence[int]
) -> Dict[str, Tensor]:
    """Official paper detector trunk. ``sd``: keys without the ``backbone.bottom_up.`` prefix."""
    s0, s1, t = _conv_stages(x, sd, 1e-5)
    b, n, c = t.shape
    h, w = x.shape[2] // 16, x.shape[3] // 16
    assert n == sd["pos_embed"].shape[1], "official code: grid must equal the pos_embed grid"
    t = t + sd["pos_embed"]
    g_bias = _beit_bias(sd["global_rel_pos_bias.relative_position_bias_table"], h, w)
    w_bias = _beit_bias(
        sd["windowed_rel_pos_bias.relative_position_bias_table"], window_size, window_size
    )
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks3."))
    for i in range(depth):
        key = f"blocks3.{i}"
        if i in global_blocks:
            t = _block(t, sd, key, heads, lambda y: _attention(y, sd, key + ".attn", heads,
                                                               lambda q: g_bias))  # fmt: skip
        else:
            win = _to_windows(t, h, w, window_size)
            win = _block(win, sd, key, heads, lambda y: _attention(y, sd, key + ".attn", heads,
                                                                   lambda q: w_bias))  # fmt: skip
            t = _from_windows(win, b, h, w, window_size)
    s2 = t.transpose(1, 2).reshape(b, c, h, w)
    return {"s0": s0, "s1": s1, "s2": s2, "s3": F.max_pool2d(s2, 2)}


# ------------------------------------------------------------------ ViTDet style (decomposed)
def _rel_pos_lookup(size: int, table: Tensor) -> Tensor:
    """(size, size, dim) relative embeddings, linearly resizing ``table`` to 2*size-1 rows."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()
    coords = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return table[coords]


def _decomposed_bias(q: Tensor, sd: SD, key: str, h: int, w: int) -> Tensor:
    b, heads, n, dim = q.shape
    rh = _rel_pos_lookup(h, sd[key + ".rel_pos_h"])
    rw = _rel_pos_lookup(w, sd[key + ".rel_pos_w"])
    rq = q.reshape(b, heads, h, w, dim)
    bias_h = (rq[:, :, :, :, None, :] * rh[None, None, :, None, :, :]).sum(-1)  # (b,H,h,w,kh)
    bias_w = (rq[:, :, :, :, None, :] * rw[None, None, None, :, :, :]).sum(-1)  # (b,H,h,w,kw)
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, heads, n, n)


def vitdet_trunk_forward(
    x: Tensor, sd: SD, *, heads: int, window_size: int, window_blocks: Sequence[int]
) -> Dict[str, Tensor]:
    """Official-ConvMAE-Det trunk. ``sd``: keys without the ``backbone.net.`` prefix."""
    _, _, t = _conv_stages(x, sd, 1e-6)
    b, n, c = t.shape
    h, w = x.shape[2] // 16, x.shape[3] // 16
    pos = sd["pos_embed"]
    side = int(math.sqrt(pos.shape[1]))
    pos = pos.reshape(1, side, side, c).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    t = t + pos.permute(0, 2, 3, 1).reshape(1, h * w, c)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks3."))
    ws = window_size
    for i in range(depth):
        key = f"blocks3.{i}"
        if i not in window_blocks:
            attend = lambda y, key=key: _attention(  # noqa: E731
                y, sd, key + ".attn", heads, lambda q: _decomposed_bias(q, sd, key + ".attn", h, w)
            )
            t = _block(t, sd, key, heads, attend)
            continue
        # windowed: pad the normed grid with zeros (after norm1, like ViTDet), attend per window
        shortcut = t
        y = _ln(t, sd, key + ".norm1", 1e-6).reshape(b, h, w, c)
        hp, wp = h + (-h) % ws, w + (-w) % ws
        y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
        win = _to_windows(y, hp, wp, ws)
        win = _attention(
            win, sd, key + ".attn", heads, lambda q: _decomposed_bias(q, sd, key + ".attn", ws, ws)
        )
        y = _from_windows(win, b, hp, wp, ws).reshape(b, hp, wp, c)[:, :h, :w].reshape(b, n, c)
        t = shortcut + y
        t = t + _mlp(_ln(t, sd, key + ".norm2", 1e-6), sd, key + ".mlp")
    return {"last_feat": t.transpose(1, 2).reshape(b, c, h, w)}
