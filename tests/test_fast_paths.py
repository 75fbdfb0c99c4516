"""Fast paths keep the numbers of the plain path: SDPA vs explicit attention (gradients, bf16),
channels-last convolutions, per-stage activation checkpointing, shared biases built once."""

import os

import pytest
import torch

from convmae_det.fast_paths import (
    FastPaths,
    act_checkpoint_disabled,
    apply_fast_paths,
    autocast,
    fast_path_coverage,
    resolve_attn,
    set_act_checkpoint,
    set_channels_last,
    set_fused_attn,
)
from convmae_det.modeling import ConvViT
from tests.conftest import tiny_convvit_kwargs

REL_POS_KINDS = ["shared", "per_block", "decomposed", "none"]


def _model(rel_pos, **kw):
    """Window 4 on a 6x7 grid (padded windows), one global and two windowed blocks."""
    kwargs = tiny_convvit_kwargs(
        window_size=4,
        window_block_indexes=[0, 2],
        rel_pos=rel_pos,
        rel_pos_hw=(6, 8),
        pos_embed_hw=(6, 8),
    )
    kwargs.update(kw)
    model = ConvViT(**kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel" in name:
                p.normal_(std=0.5)
    return model


def _input(batch=2):
    return torch.randn(batch, 3, 96, 112)


def _grads(model, x, dtype="fp32"):
    model.zero_grad(set_to_none=True)
    with autocast("cpu", dtype):
        out = model(x)
        loss = sum(o.float().square().mean() for o in out.values())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_dicts(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().item() + 1e-12
        err = (a[name] - b[name]).abs().max().item()
        assert err <= atol + rtol * scale, f"{name}: max err {err:.3g}, max value {scale:.3g}"


@pytest.mark.parametrize("rel_pos", REL_POS_KINDS)
def test_fused_and_explicit_attention_give_the_same_gradients(rel_pos):
    model = _model(rel_pos).train()
    x = _input()
    set_fused_attn(model, True)
    fused = _grads(model, x)
    set_fused_attn(model, False)
    explicit = _grads(model, x)
    _assert_close_dicts(fused, explicit, rtol=1e-4, atol=1e-6)
    if rel_pos != "none":
        assert any("rel" in n for n in fused), "relative-position tables must get gradients"


@pytest.mark.parametrize("rel_pos", REL_POS_KINDS)
def test_bf16_autocast_fused_and_explicit_agree_and_track_fp32(rel_pos):
    model = _model(rel_pos).eval()
    x = _input()
    with torch.no_grad():
        ref = model(x)["e3"]
        with autocast("cpu", "bf16"):
            fused = model(x)["e3"].float()
        set_fused_attn(model, False)
        with autocast("cpu", "bf16"):
            explicit = model(x)["e3"].float()
    scale = ref.abs().max()
    assert (fused - explicit).abs().max() <= 2e-2 * scale
    assert (fused - ref).abs().max() <= 5e-2 * scale
    # relative error of the whole map, bf16 has an 8-bit mantissa
    assert (fused - ref).norm() / ref.norm() < 1e-2


def test_bf16_gradients_track_fp32_gradients():
    model = _model("shared").train()
    x = _input()
    ref = _grads(model, x)
    low = _grads(model, x, "bf16")
    for name in ref:
        rel = (low[name] - ref[name]).norm() / (ref[name].norm() + 1e-12)
        assert rel < 5e-2, f"{name}: relative error {rel:.3g}"


def test_shared_biases_are_built_once_cast_once_and_broadcast_over_the_batch():
    model = _model("shared").eval()
    seen = []
    for blk in model.blocks3:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad(), autocast("cpu", "bf16"):
        model(_input(batch=3))
    global_bias, window_bias = seen[1], seen[0]
    assert window_bias is seen[2], "windowed blocks share one bias tensor"
    assert global_bias.dtype == window_bias.dtype == torch.bfloat16
    assert global_bias.shape == (1, 4, 42, 42)  # 6x7 grid, batch dimension broadcast
    assert window_bias.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_gives_the_same_features_and_gradients(train):
    model = _model("shared").train(train)
    x = _input()
    if train:
        ref = _grads(model, x)
        set_channels_last(model)
        cl = _grads(model, x.contiguous(memory_format=torch.channels_last))
        _assert_close_dicts(cl, ref, rtol=1e-4, atol=1e-6)
    else:
        with torch.no_grad():
            ref = model(x)
            set_channels_last(model)
            cl = model(x.contiguous(memory_format=torch.channels_last))
        assert cl["e1"].is_contiguous(memory_format=torch.channels_last)
        for k in ref:
            assert torch.allclose(cl[k], ref[k], atol=1e-5), k
    assert model.blocks1[0].attn.weight.is_contiguous(memory_format=torch.channels_last)


def test_checkpointing_every_stage_gives_the_same_gradients_and_recomputes_the_blocks():
    model = _model("decomposed").train()
    x = _input(batch=1)
    ref = _grads(model, x)
    calls = []
    model.blocks1[0].attn.register_forward_hook(lambda *a: calls.append(1))
    assert set_act_checkpoint(model, (1, 2, 3)) == 5
    ckpt = _grads(model, x)
    _assert_close_dicts(ckpt, ref, rtol=1e-5, atol=1e-7)
    assert len(calls) == 2, "a checkpointed conv block runs again in backward"
    assert sorted(model.state_dict()) == sorted(
        ConvViT(
            **tiny_convvit_kwargs(
                window_size=4,
                window_block_indexes=[0, 2],
                rel_pos="decomposed",
                rel_pos_hw=(6, 8),
                pos_embed_hw=(6, 8),
            )
        ).state_dict()
    )


def test_checkpointing_can_be_suspended_and_switched_off():
    model = _model("none")
    set_act_checkpoint(model, (1, 3))
    calls = []
    model.blocks1[0].attn.register_forward_hook(lambda *a: calls.append(1))
    with act_checkpoint_disabled(model):
        assert not model.use_act_checkpoint
        _grads(model.train(), _input(batch=1))
        assert len(calls) == 1
    assert model.use_act_checkpoint and "forward" in model.blocks1[0].__dict__
    assert "forward" not in model.blocks2[0].__dict__
    set_act_checkpoint(model, ())
    assert "forward" not in model.blocks1[0].__dict__ and not model.use_act_checkpoint


def test_apply_fast_paths_switches_every_attention_module():
    model = _model("shared")
    apply_fast_paths(model, FastPaths(attn="explicit", channels_last=True, act_checkpoint=(3,)))
    assert all(not blk.attn.fused for blk in model.blocks3)
    assert model.use_act_checkpoint
    assert model.patch_embed1.proj.weight.is_contiguous(memory_format=torch.channels_last)


def test_fast_path_settings_are_validated():
    with pytest.raises(ValueError, match="dtype"):
        FastPaths(dtype="int8")
    with pytest.raises(ValueError, match="attn"):
        FastPaths(attn="flash")
    with pytest.raises(ValueError, match="stages"):
        FastPaths(act_checkpoint=(4,))
    assert FastPaths(act_checkpoint=(3, 1, 3)).act_checkpoint == (1, 3)


@pytest.mark.skipif(
    os.environ.get("CONVMAE_TEST_COMPILE") != "1",
    reason="torch.compile smoke test is slow on CPU; set CONVMAE_TEST_COMPILE=1 to run it",
)
def test_compiled_backbone_matches_eager():
    model = _model("shared").eval()
    x = _input(batch=1)
    with torch.no_grad():
        ref = model(x)["e3"]
        apply_fast_paths(model, FastPaths(compile=True))
        out = model(x)["e3"]
    assert torch.allclose(out, ref, atol=1e-4)


def test_auto_attention_takes_sdpa_except_for_cpu_training_with_relative_positions():
    with_bias, without = _model("shared"), _model("none")
    assert resolve_attn(with_bias, "auto", device="cpu", training=False)
    assert not resolve_attn(with_bias, "auto", device="cpu", training=True)
    assert resolve_attn(without, "auto", device="cpu", training=True)
    assert resolve_attn(with_bias, "auto", device="cuda", training=True)
    assert not resolve_attn(with_bias, "explicit", device="cuda", training=False)
    apply_fast_paths(with_bias, FastPaths(attn="auto"), device="cpu", training=True)
    assert fast_path_coverage(with_bias)["sdpa_attention_modules"] == 0
    apply_fast_paths(with_bias, FastPaths(attn="auto"), device="cpu", training=False)
    assert fast_path_coverage(with_bias) == {
        "convvit_encoders": 1,
        "attention_modules": 3,
        "sdpa_attention_modules": 3,
        "checkpointed_blocks": 0,
    }
