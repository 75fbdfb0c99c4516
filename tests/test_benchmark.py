"""The benchmark tool: CLI on the toy preset, every JSON field, FLOP counting, synthetic detectron2
batches, full-model train / inference steps from a config file, A/B timing."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2 import model_zoo
from detectron2.structures import BitMasks, PolygonMasks

from convmae_det.benchmark import (
    AB_MARKDOWN_HEADER,
    MARKDOWN_HEADER,
    RESULT_FIELDS,
    BenchmarkConfig,
    BenchmarkSetupError,
    build_preset,
    build_subject,
    count_flops,
    format_summary,
    make_step,
    markdown_ab_row,
    markdown_row,
    measure_matmul_peak,
    run_ab,
    run_benchmark,
    synthetic_detection_batch,
)
from convmae_det.benchmark.measure import summarize_times
from convmae_det.fast_paths import FastPaths, set_fused_attn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# detectron2's own ViTDet Mask R-CNN config, shrunk to CPU size through overrides
TINY_VITDET_OPTS = [
    "model.backbone.net.embed_dim=32",
    "model.backbone.net.depth=2",
    "model.backbone.net.num_heads=2",
    "model.backbone.net.window_size=4",
    "model.backbone.net.window_block_indexes=[0]",
    "model.backbone.net.img_size=64",
    "model.backbone.square_pad=64",
    "model.roi_heads.box_head.conv_dims=[16]",
    "model.roi_heads.mask_head.conv_dims=[16]",
    "model.proposal_generator.post_nms_topk=[32,32]",
    "model.roi_heads.batch_size_per_image=16",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Timed loops with several threads stall badly on a loaded machine; the numbers do not
    matter here, the run time does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fast_cfg(**kw):
    base = dict(preset="toy", device="cpu", warmup=0, iters=2, peak_tflops=1.0)
    base.update(kw)
    return BenchmarkConfig(**base)


def test_cli_on_the_toy_preset_writes_json_with_every_field(tmp_path):
    out = tmp_path / "toy.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "benchmark.py"),
        "--preset",
        "toy",
        "--mode",
        "backbone_train",
        "--device",
        "cpu",
        "--size",
        "64",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # CPU training with rel-pos biases: "auto" takes the explicit attention
    assert summary.startswith("toy backbone_train on cpu bs1 64x64 fp32+explicit-attn(auto) ")
    assert "ms/img" in summary and "GFLOP/img" in summary and "MFU" in summary
    result = json.loads(out.read_text())
    assert set(result) == set(RESULT_FIELDS)
    assert result["image_size"] == [64, 64] and result["iters"] == 2
    assert result["ms_per_img"] > 0 and result["img_per_s"] == pytest.approx(
        1000 / result["ms_per_img"]
    )
    stats = result["ms_per_img_stats"]
    assert stats["min"] <= stats["median"] <= stats["max"]
    assert result["peak_mem_bytes"] > 0 and result["mem_kind"].startswith("cpu")
    assert result["flops_per_img"] > 0 and result["saved_activation_bytes_per_img"] > 0
    assert result["tflops_per_s"] == pytest.approx(
        result["flops_per_img"] / result["ms_per_img"] / 1e9
    )
    assert result["peak_source"].startswith("measured") and result["peak_tflops"] > 0
    assert result["mfu"] == pytest.approx(result["tflops_per_s"] / result["peak_tflops"])
    assert result["fast_paths"] == FastPaths().to_dict()
    assert result["num_threads"] == 1
    row = markdown_row(result)
    assert row.count("|") == MARKDOWN_HEADER.splitlines()[0].count("|")
    assert "| toy | backbone_train | 1 | 64x64 | fp32 explicit-attn(auto) |" in row


def test_flops_are_per_image_and_include_the_fused_cpu_attention():
    model = build_preset("toy").eval()
    counts = {}
    for fused in (True, False):
        set_fused_attn(model, fused)
        step, _ = make_step(
            model,
            "backbone",
            batch_size=2,
            image_size=(64, 64),
            paths=FastPaths(),
            device=torch.device("cpu"),
        )
        counts[fused], by_op = count_flops(step)
    assert counts[True] == counts[False]
    r1 = run_benchmark(_fast_cfg(mode="backbone", batch_size=1, image_size=(64, 64), iters=1))
    r2 = run_benchmark(_fast_cfg(mode="backbone", batch_size=2, image_size=(64, 64), iters=1))
    assert r1["flops_per_img"] == r2["flops_per_img"] == counts[True] / 2
    # fwd + bwd is about three forwards
    r3 = run_benchmark(_fast_cfg(mode="backbone_train", image_size=(64, 64), iters=1))
    assert 2.5 < r3["flops_per_img"] / r1["flops_per_img"] < 3.5


def test_time_statistics_are_per_image_milliseconds():
    stats = summarize_times([0.2, 0.4, 0.6, 0.8, 1.0], per=2)
    assert stats["median"] == pytest.approx(300.0)
    assert stats["min"] == pytest.approx(100.0) and stats["max"] == pytest.approx(500.0)
    assert stats["p10"] == pytest.approx(140.0) and stats["p90"] == pytest.approx(460.0)
    assert stats["spread"] == pytest.approx(320.0 / 300.0)


def test_matmul_peak_is_a_positive_rate():
    assert measure_matmul_peak(torch.device("cpu"), torch.float32, size=128, iters=2) > 0


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_synthetic_detection_batch_has_valid_instances(mask_format):
    batch = synthetic_detection_batch(2, (48, 80), num_instances=5, mask_format=mask_format)
    assert len(batch) == 2
    for item in batch:
        assert item["image"].shape == (3, 48, 80) and item["image"].dtype == torch.uint8
        inst = item["instances"]
        assert inst.image_size == (48, 80) and len(inst) == 5
        boxes = inst.gt_boxes.tensor
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 48).all()
        masks = inst.gt_masks
        assert isinstance(masks, PolygonMasks if mask_format == "polygon" else BitMasks)
        if mask_format == "bitmask":
            assert masks.tensor.shape == (5, 48, 80) and (masks.tensor.sum((1, 2)) > 0).all()
    no_gt = synthetic_detection_batch(1, (32, 32), with_instances=False)
    assert "instances" not in no_gt[0] and no_gt[0]["height"] == 32


def test_full_model_train_and_inference_steps_from_a_config_file():
    path = model_zoo.get_config_file("common/models/mask_rcnn_vitdet.py")
    common = dict(
        config_file=path,
        opts=TINY_VITDET_OPTS,
        image_size=(64, 64),
        device="cpu",
        warmup=0,
        iters=1,
        peak_tflops=0,
    )
    train = run_benchmark(BenchmarkConfig(mode="train", mask_format="bitmask", **common))
    assert train["flops_per_img"] > 0 and train["saved_activation_bytes_per_img"] > 0
    assert train["mfu"] is None and train["peak_source"] is None
    infer = run_benchmark(BenchmarkConfig(mode="inference", **common))
    assert infer["detections_per_img"] == 100  # score threshold 0: test_topk_per_image kept
    backbone = build_subject(BenchmarkConfig(mode="backbone", **common))
    assert type(backbone).__name__ == "SimpleFeaturePyramid"
    assert sum(p.numel() for p in backbone.parameters()) < infer["params"]
    assert "train on cpu bs1 64x64" in format_summary(train)


def test_ab_timing_reports_both_paths_and_the_speedup():
    result = run_ab(_fast_cfg(image_size=(64, 64), iters=2), FastPaths(attn="explicit"))
    for key in ("fast", "baseline"):
        assert result[key]["ms_per_img_stats"]["median"] > 0
    assert result["baseline"]["fast_paths"]["attn"] == "explicit"
    row = markdown_ab_row(result)
    assert row.startswith("| ") and row.count("|") == AB_MARKDOWN_HEADER.splitlines()[0].count("|")
    assert result["cpu_time_speedup"] > 0
    assert result["speedup"] == pytest.approx(
        result["baseline"]["ms_per_img_stats"]["median"]
        / result["fast"]["ms_per_img_stats"]["median"]
    )


def test_pretraining_step_runs_or_is_skipped_with_a_reason():
    if importlib.util.find_spec("convmae_det.modeling.pretrain") is None:
        with pytest.raises(BenchmarkSetupError, match="build_pretrain_model"):
            build_preset("convmae_toy")
        pytest.skip("convmae_det.modeling.pretrain is not available")
    result = run_benchmark(_fast_cfg(preset="convmae_toy", mode="pretrain", iters=1))
    assert result["flops_per_img"] > 0 and result["ms_per_img"] > 0


def test_invalid_benchmark_settings_are_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        BenchmarkConfig(preset="toy", config_file="x.py")
    with pytest.raises(ValueError, match="config-file"):
        BenchmarkConfig(preset="toy", mode="train")
    with pytest.raises(ValueError, match="pretraining preset"):
        BenchmarkConfig(preset="toy", mode="pretrain")
    with pytest.raises(ValueError, match="mode"):
        BenchmarkConfig(preset="toy", mode="fastest")
    with pytest.raises(KeyError, match="unknown preset"):
        build_preset("convvit_xxl")


def test_grouped_convolution_backward_is_counted_like_its_forward():
    conv = torch.nn.Conv2d(64, 64, 5, padding=2, groups=64)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    forward, _ = count_flops(lambda: conv(x))
    total, by_op = count_flops(lambda: conv(x).sum().backward())
    assert forward == 2 * 16 * 16 * 25 * 64 * 2
    assert by_op["aten.convolution_backward"] == 2 * forward  # grad input + grad weight


def test_project_configs_run_with_the_fast_paths_reaching_the_encoder():
    common = dict(device="cpu", warmup=0, iters=1, peak_tflops=0, batch_size=2)
    det = run_benchmark(
        BenchmarkConfig(
            config_file=os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py"),
            mode="train",
            image_size=(128, 128),
            paths=FastPaths(channels_last=True, act_checkpoint=(1, 3)),
            **common,
        )
    )
    cov = det["fast_path_coverage"]
    assert cov["convvit_encoders"] == 1 and cov["attention_modules"] > 0
    assert cov["sdpa_attention_modules"] == 0  # CPU training with rel-pos: explicit
    assert cov["checkpointed_blocks"] > 0
    seg = run_benchmark(
        BenchmarkConfig(
            config_file=os.path.join(ROOT, "configs/ADE20K/upernet_convmae_toy.yaml"),
            mode="train",
            image_size=(64, 64),
            **common,
        )
    )
    assert seg["flops_per_img"] > 0 and seg["fast_path_coverage"]["convvit_encoders"] == 1


def test_synthetic_label_maps_for_semantic_segmentation():
    (item,) = synthetic_detection_batch(
        1, (40, 60), with_instances=False, sem_seg_classes=7, ignore_value=255
    )
    labels = item["sem_seg"]
    assert labels.shape == (40, 60) and labels.dtype == torch.int64
    values = set(labels.unique().tolist())
    assert 255 in values and values - {255} <= set(range(7))
