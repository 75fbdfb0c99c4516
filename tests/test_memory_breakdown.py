"""Saved-activation breakdown (convmae_det.benchmark.memory) and the "attn" checkpoint policy.

Toy preset (embed 32/48/64, depths 1/1/3, 4 heads, window 4, block 1 windowed) at 128x128:
stage-1 maps 32x32, stage-2 16x16, stage-3 grid 8x8 = 64 tokens; the global blocks 0 and 2 attend
over 64 tokens, the windowed block 1 over 4 windows of 16.
"""

import copy
import importlib.util
import json
import os

import pytest
import torch

from convmae_det.benchmark import BenchmarkConfig, build_preset, run_benchmark
from convmae_det.benchmark.memory import (
    KINDS,
    STAGES,
    checkpoint_sweep,
    cuda_path_emulation,
    format_breakdown_table,
    format_sweep_table,
    memory_breakdown,
)
from convmae_det.fast_paths import FastPaths, autocast, set_act_checkpoint, set_fused_attn
from tests.conftest import ROOT

HEADS, TOKENS, WINDOWS, WINDOW_TOKENS = 4, 64, 4, 16


def _cfg(preset="toy", size=128, **paths):
    return BenchmarkConfig(
        preset=preset,
        image_size=(size, size),
        device="cpu",
        paths=FastPaths(**paths),
        warmup=0,
        iters=1,
        peak_tflops=0,
        count_flops=False,
    )


def _attn_matrix_bytes(bytes_per_element):
    glob = HEADS * TOKENS * TOKENS * bytes_per_element
    win = WINDOWS * HEADS * WINDOW_TOKENS * WINDOW_TOKENS * bytes_per_element
    return glob, win


def test_parts_sum_to_the_total_and_fake_tensors_count_like_real_ones():
    cfg = _cfg(dtype="bf16", channels_last=True)
    fake = memory_breakdown(cfg, path="cpu", fake=True)
    real = memory_breakdown(cfg, path="cpu", fake=False, keep=True)
    total = fake["total_bytes"]
    assert total == sum(fake["by_stage"].values()) == sum(fake["by_kind"].values())
    assert total == sum(sum(v.values()) for v in fake["by_stage_kind"].values())
    assert total == sum(sum(v.values()) for v in fake["by_block"].values())
    assert set(fake["by_kind"]) <= set(KINDS) and set(fake["by_stage"]) <= set(STAGES)
    assert set(fake["by_stage"]) == {"stage1", "stage2", "stage3"}
    for key in ("total_bytes", "by_stage", "by_kind", "by_block"):
        assert fake[key] == real[key], key
    # the runner's count of a real forward + backward step (which keeps the tensors) agrees
    assert run_benchmark(cfg)["saved_activation_bytes_per_img"] == total
    assert "| **total** |" in format_breakdown_table(fake)


@pytest.mark.parametrize("dtype,bytes_per_element", [("fp32", 4), ("bf16", 6)])
def test_attention_matrices_belong_to_stage3_with_the_expected_bytes(dtype, bytes_per_element):
    # explicit path: float32 softmax output, plus its bf16 copy for @V under autocast
    res = memory_breakdown(_cfg(dtype=dtype), path="cpu")
    glob, win = _attn_matrix_bytes(bytes_per_element)
    assert res["attention"] == "explicit"
    blocks = res["by_block"]
    assert blocks["stage3/blocks3.0"]["attn_matrix"] == glob
    assert blocks["stage3/blocks3.1"]["attn_matrix"] == win
    assert blocks["stage3/blocks3.2"]["attn_matrix"] == glob
    assert res["by_kind"]["attn_matrix"] == 2 * glob + win
    assert [s for s, kinds in res["by_stage_kind"].items() if "attn_matrix" in kinds] == ["stage3"]


def test_cuda_path_keeps_no_attention_matrix_but_the_shared_biases_once():
    cfg = _cfg(dtype="bf16")
    cpu = memory_breakdown(cfg, path="cpu")
    cuda = memory_breakdown(cfg, path="cuda")
    assert cuda["attention"] == "sdpa"
    assert "attn_matrix" not in cuda["by_kind"]
    # the memory-efficient kernel keeps its mask: the shared global (1, heads, 64, 64) and window
    # (1, heads, 16, 16) bf16 biases, once for all blocks (row-major, broadcast over windows)
    shared = HEADS * TOKENS * TOKENS * 2 + HEADS * WINDOW_TOKENS * WINDOW_TOKENS * 2
    assert cuda["by_kind"]["rel_pos"] - cpu["by_kind"]["rel_pos"] == shared
    # CUDA autocast runs LayerNorm in float32: the conv stages keep float32 norm inputs
    assert cuda["by_stage_kind"]["stage1"]["norm"] > cpu["by_stage_kind"]["stage1"]["norm"]


def test_cuda_path_attention_gives_the_numbers_of_the_explicit_path():
    model = build_preset("toy").train()
    x = torch.randn(1, 3, 128, 128)

    def run(fused, emulate):
        model.zero_grad(set_to_none=True)
        set_fused_attn(model, fused)
        with cuda_path_emulation() if emulate else autocast("cpu", "fp32"):
            out = model(x)
            loss = sum(o.square().mean() for o in out.values())
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out["e3"].detach(), grads

    ref_out, ref_grads = run(False, False)
    out, grads = run(True, True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_checkpointing_a_stage_leaves_only_its_inputs():
    res = memory_breakdown(_cfg(act_checkpoint=(1,)), path="cpu")
    assert res["by_block"]["stage1/blocks1.0"] == {"checkpoint_input": 32 * 32 * 32 * 4}
    res = memory_breakdown(_cfg(act_checkpoint=(2,)), path="cpu")
    assert res["by_block"]["stage2/blocks2.0"] == {"checkpoint_input": 48 * 16 * 16 * 4}
    res = memory_breakdown(_cfg(act_checkpoint=(3,)), path="cpu")
    assert not [b for b in res["by_block"] if b.startswith("stage3/blocks3")]
    # three block inputs (1, 8, 8, 64) and the two shared biases, held by the checkpoints
    held = 3 * TOKENS * 64 * 4 + HEADS * TOKENS**2 * 4 + HEADS * WINDOW_TOKENS**2 * 4
    assert res["by_block"]["stage3/(encoder)"] == {"checkpoint_input": held}


def test_attention_core_checkpointing_keeps_qkv_and_the_bias_only():
    plain = memory_breakdown(_cfg(dtype="bf16"), path="cpu")
    res = memory_breakdown(_cfg(dtype="bf16", act_checkpoint=("attn",)), path="cpu")
    assert "attn_matrix" not in res["by_kind"]
    qkv = TOKENS * 3 * 64 * 2  # (1, 64, 192) bf16 output of attn.qkv, holds q, k and v
    blocks = res["by_block"]
    assert blocks["stage3/blocks3.0"]["checkpoint_input"] == qkv + HEADS * TOKENS**2 * 2
    assert blocks["stage3/blocks3.1"]["checkpoint_input"] == qkv + HEADS * WINDOW_TOKENS**2 * 2
    assert blocks["stage3/blocks3.2"]["checkpoint_input"] == qkv
    assert res["by_stage"]["stage1"] == plain["by_stage"]["stage1"]
    assert res["total_bytes"] < plain["total_bytes"] - plain["by_kind"]["attn_matrix"] // 2


@pytest.mark.parametrize(
    "preset,fused,policy",
    [
        ("toy", False, (1,)),
        ("toy", False, (2,)),
        ("toy", False, (3,)),
        ("toy", False, ("attn",)),
        ("toy", False, (1, 2, 3, "attn")),
        ("toy_vitdet", False, ("attn",)),
        ("toy_vitdet", True, ("attn",)),
    ],
)
def test_checkpointing_keeps_outputs_and_gradients_bit_identical(preset, fused, policy):
    base = build_preset(preset).train()
    with torch.no_grad():  # non-zero relative-position tables
        for name, p in base.named_parameters():
            if "rel_pos" in name or "relative_position" in name:
                p.normal_(std=0.5)
    ckpt = copy.deepcopy(base)
    x = torch.randn(2, 3, 96, 128)
    results = []
    for model, stages in ((base, ()), (ckpt, policy)):
        set_fused_attn(model, fused)
        set_act_checkpoint(model, stages)
        out = model(x)
        sum(o.square().mean() for o in out.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_sweep_measures_the_recomputed_flops():
    sweep = checkpoint_sweep(_cfg(), policies=[("attn",), (1,)])
    rows = {",".join(map(str, r["act_checkpoint"])) or "none": r for r in sweep["rows"]}
    assert list(rows) == ["none", "attn", "1"]
    # explicit path: the recomputation stops once the probabilities exist, so "attn" costs one
    # QK^T per block: 2 * N^2 * C for each global block, per window for the windowed one
    qk = 2 * (2 * TOKENS**2 * 64) + WINDOWS * 2 * WINDOW_TOKENS**2 * 64
    assert rows["attn"]["cpu_extra_flops_per_img"] == qk
    # SDPA with shared biases keeps no N x N tensor, so the policy leaves it alone
    assert rows["attn"]["cuda_extra_flops_per_img"] == 0
    assert rows["attn"]["cuda_bytes_per_img"] == rows["none"]["cuda_bytes_per_img"]
    assert rows["attn"]["cpu_bytes_per_img"] < rows["none"]["cpu_bytes_per_img"]
    assert 0 < rows["1"]["cpu_extra_flops_pct"] < 100
    assert rows["1"]["cpu_bytes_per_img"] < rows["none"]["cpu_bytes_per_img"]
    assert "| attn |" in format_sweep_table(sweep)


def test_cli_memory_breakdown_writes_both_paths(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "benchmark_tool", os.path.join(ROOT, "tools", "benchmark.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool._stages("1,attn") == (1, "attn")
    out = tmp_path / "mem.json"
    argv = ["--preset", "toy", "--size", "64", "--device", "cpu", "--dtype", "bf16"]
    tool.main(argv + ["--act-checkpoint", "attn", "--memory-breakdown", "--output", str(out)])
    result = json.loads(out.read_text())
    assert set(result) == {"cpu", "cuda"}
    assert result["cpu"]["act_checkpoint"] == ["attn"]
    assert result["cpu"]["total_bytes"] == sum(result["cpu"]["by_stage"].values())
    printed = capsys.readouterr().out
    assert "CPU path" in printed and "CUDA path" in printed and "| stage |" in printed
