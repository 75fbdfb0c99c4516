"""An independent, minimal re-implementation of the official ConvMAE segmenter for tests.

Written from the official forward pass (mmseg backbone ``ConvMAE`` + ``UPerHead`` + ``FCNHead``
key layout), sharing no code with ``convmae_det``: it produces the official state-dict layout
(``relative_position_index`` buffers, SyncBN counters) and the reference backbone outputs.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialPatchEmbed(nn.Module):
    def __init__(self, patch, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, patch, patch)
        self.norm = nn.LayerNorm(cout)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.proj(x)
        return self.act(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class OfficialConvMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OfficialCBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = OfficialConvMlp(dim, 4 * dim)

    def forward(self, x):
        y = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.conv2(self.attn(self.conv1(y)))
        y = self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.mlp(y)


class OfficialAttention(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        wh, ww = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), heads)
        )
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
        flat = coords.flatten(1)  # 2, N
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()  # N, N, 2
        rel[:, :, 0] += wh - 1
        rel[:, :, 1] += ww - 1
        rel[:, :, 0] *= 2 * ww - 1
        self.register_buffer("relative_position_index", rel.sum(-1))

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class OfficialMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OfficialBlock(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = OfficialAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = OfficialMlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(torch.ones(dim))
        self.gamma_2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class OfficialConvMAESeg(nn.Module):
    """Backbone of the official segmenter for an ``img_size`` input (tiny widths in tests)."""

    def __init__(self, img_size, dims, depths, heads):
        super().__init__()
        grid = (img_size // 16, img_size // 16)
        self.patch_embed1 = OfficialPatchEmbed(4, 3, dims[0])
        self.patch_embed2 = OfficialPatchEmbed(2, dims[0], dims[1])
        self.patch_embed3 = OfficialPatchEmbed(2, dims[1], dims[2])
        self.patch_embed4 = nn.Linear(dims[2], dims[2])
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dims[2]))
        self.blocks1 = nn.ModuleList(OfficialCBlock(dims[0]) for _ in range(depths[0]))
        self.blocks2 = nn.ModuleList(OfficialCBlock(dims[1]) for _ in range(depths[1]))
        self.blocks3 = nn.ModuleList(OfficialBlock(dims[2], heads, grid) for _ in range(depths[2]))
        self.fpn = nn.Sequential(
            nn.Conv2d(dims[2], dims[2], 3, stride=2), nn.SyncBatchNorm(dims[2]), nn.GELU()
        )

    def forward(self, x):
        outs = []
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x)
        outs.append(x)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        outs.append(x)
        x = self.patch_embed3(x)
        b, c, h, w = x.shape
        x = self.patch_embed4(x.flatten(2).transpose(1, 2)) + self.pos_embed
        for blk in self.blocks3:
            x = blk(x)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        outs.append(x)
        outs.append(self.fpn(x))
        return outs


def randomize_(module: nn.Module, seed: int = 0) -> None:
    """Fill every parameter and BN statistic with random values (positive variances)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * 0.2
                + (1.0 if p.dim() == 1 and "norm" in name else 0.0)
            )
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(1234)


def _conv_module(prefix, cin, cout, k, gen):
    """mmcv ConvModule(conv without bias, SyncBN) keys."""
    return {
        f"{prefix}.conv.weight": torch.randn(cout, cin, k, k, generator=gen) * 0.1,
        f"{prefix}.bn.weight": torch.rand(cout, generator=gen) + 0.5,
        f"{prefix}.bn.bias": torch.randn(cout, generator=gen) * 0.1,
        f"{prefix}.bn.running_mean": torch.randn(cout, generator=gen) * 0.1,
        f"{prefix}.bn.running_var": torch.rand(cout, generator=gen) + 0.5,
        f"{prefix}.bn.num_batches_tracked": torch.tensor(1234),
    }


def official_head_state(
    in_channels, channels, num_classes, aux_channels, pool_scales=(1, 2, 3, 6), seed=1
):
    """Random ``decode_head.*`` (UPerHead) and ``auxiliary_head.*`` (FCNHead on level 2) keys."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, _ in enumerate(pool_scales):
        sd.update(_conv_module(f"decode_head.psp_modules.{i}.1", in_channels[-1], channels, 1, gen))
    cat = in_channels[-1] + len(pool_scales) * channels
    sd.update(_conv_module("decode_head.bottleneck", cat, channels, 3, gen))
    for i, cin in enumerate(in_channels[:-1]):
        sd.update(_conv_module(f"decode_head.lateral_convs.{i}", cin, channels, 1, gen))
        sd.update(_conv_module(f"decode_head.fpn_convs.{i}", channels, channels, 3, gen))
    sd.update(
        _conv_module("decode_head.fpn_bottleneck", len(in_channels) * channels, channels, 3, gen)
    )
    sd["decode_head.conv_seg.weight"] = torch.randn(num_classes, channels, 1, 1, generator=gen)
    sd["decode_head.conv_seg.bias"] = torch.randn(num_classes, generator=gen)
    sd.update(_conv_module("auxiliary_head.convs.0", in_channels[2], aux_channels, 3, gen))
    sd["auxiliary_head.conv_seg.weight"] = torch.randn(
        num_classes, aux_channels, 1, 1, generator=gen
    )
    sd["auxiliary_head.conv_seg.bias"] = torch.randn(num_classes, generator=gen)
    return sd


def official_upernet_forward(sd, feats, pool_scales=(1, 2, 3, 6)):
    """mmseg UPerHead inference with BN in eval mode, from the official state dict."""

    def cm(prefix, x, pad):
        w = sd[f"{prefix}.conv.weight"]
        x = F.conv2d(x, w, padding=pad)
        x = F.batch_norm(
            x,
            sd[f"{prefix}.bn.running_mean"],
            sd[f"{prefix}.bn.running_var"],
            sd[f"{prefix}.bn.weight"],
            sd[f"{prefix}.bn.bias"],
            False,
            0.0,
            1e-5,
        )
        return F.relu(x)

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    top = feats[-1]
    psp = [top] + [
        up(cm(f"decode_head.psp_modules.{i}.1", F.adaptive_avg_pool2d(top, s), 0), top.shape[2:])
        for i, s in enumerate(pool_scales)
    ]
    laterals = [cm(f"decode_head.lateral_convs.{i}", f, 0) for i, f in enumerate(feats[:-1])]
    laterals.append(cm("decode_head.bottleneck", torch.cat(psp, 1), 1))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1].shape[2:])
    outs = [cm(f"decode_head.fpn_convs.{i}", laterals[i], 1) for i in range(len(laterals) - 1)]
    outs.append(laterals[-1])
    outs = [outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]]
    x = cm("decode_head.fpn_bottleneck", torch.cat(outs, 1), 1)
    return F.conv2d(x, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])
