"""Deployment: TorchScript / ONNX exports of the toy detectors and segmenter match eager PyTorch at
sizes other than the traced one, the runner needs no model code, and bad input fails in one line
without leaving anything half-written."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

from convmae_det.deploy import (
    EXPORT_FORMAT_VERSION,
    ExportedModelError,
    ExportedPredictor,
    ExportError,
    UnsupportedExportError,
    compare_predictions,
    export_from_config,
    synthetic_image,
)
from convmae_det.deploy.compare import Comparison
from convmae_det.deploy.runner import window_grid
from convmae_det.deploy.tracing import TracedAdaptiveAvgPool2d, traceable_shapes
from convmae_det.model_from_config import build_model_from_config, load_any_config

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx / onnxruntime not installed")
ONNX = pytest.param("onnx", marks=needs_onnx)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET = "configs/toy/mask_rcnn_convvitdet_toy.py"
VITDET = "configs/toy/mask_rcnn_convmae_vitdet_toy.py"
SEG = "configs/ADE20K/upernet_convmae_toy.yaml"
WHOLE = ("TEST.SEM_SEG.MODE", "whole")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


_WEIGHTS: Dict[Tuple[str, str], str] = {}  # (workdir, config) -> checkpoint
_EXPORTS: Dict[Tuple[str, str, str, Tuple[str, ...]], str] = {}  # (workdir, config, fmt, opts)


def _weights(workdir, config: str) -> str:
    """A random checkpoint of ``config``: random position tables and BN statistics (nothing the
    export must reproduce is an identity) and decisive RPN / class / mask logits (a random head
    scores everything alike, so that rounding would decide which of the near-ties are kept)."""
    if (str(workdir), config) not in _WEIGHTS:
        torch.manual_seed(0)
        cfg, kind = load_any_config(config)
        model = build_model_from_config(cfg, kind, device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "rel_pos" in name or "relative_position" in name or "pos_embed" in name:
                    p.normal_(0.0, 0.5)
                if "objectness_logits" in name or "cls_score" in name:
                    p.mul_(10.0)
                if "mask_head.predictor" in name:
                    p.mul_(1000.0)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
        path = os.path.join(workdir, os.path.basename(config) + ".pth")
        torch.save({"model": model.state_dict()}, path)
        _WEIGHTS[(str(workdir), config)] = path
    return _WEIGHTS[(str(workdir), config)]


def _export(workdir, config: str, fmt: str, opts: Tuple[str, ...] = ()) -> str:
    key = (str(workdir), config, fmt, opts)
    if key not in _EXPORTS:
        out = os.path.join(workdir, f"{os.path.basename(config)}-{fmt}-{len(_EXPORTS)}")
        export_from_config(
            config, out, fmt=fmt, weights=_weights(workdir, config), opts=list(opts), verify=False
        )
        _EXPORTS[key] = out
    return _EXPORTS[key]


def _eager(workdir, config: str, opts: Tuple[str, ...] = ()):
    from convmae_det.visualization.predictor import Predictor

    return Predictor(
        config_file=config, opts=list(opts), weights=_weights(workdir, config), device="cpu"
    )


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("fmt", ["torchscript", ONNX])
@pytest.mark.parametrize("config", [DET, VITDET], ids=["convvitdet", "convmae_vitdet"])
def test_detector_export_matches_eager_at_two_sizes(workdir, config, fmt):
    exported = ExportedPredictor(_export(workdir, config, fmt))
    eager = _eager(workdir, config)
    # traced at 192x256; 200x170 pads the image and the 4x4 windows, 224x288 outgrows the
    # 12x12 position / relative-position tables of the toy backbones
    for h, w in [(200, 170), (224, 288)]:
        image = synthetic_image(h, w, seed=h)
        want, got = eager(image), exported(image)
        comparison = compare_predictions(want, got)
        assert comparison.eager_count > 0
        assert comparison.ok(), f"{h}x{w}: {comparison.summary()}"
        a, b = want["instances"], got["instances"]
        assert a.image_size == b.image_size == (h, w)
        assert sorted(a.get_fields()) == sorted(b.get_fields())
        assert b.pred_masks.shape == a.pred_masks.shape and b.pred_masks.dtype == torch.bool


@pytest.mark.parametrize(
    "fmt, opts",
    [
        ("torchscript", WHOLE),
        pytest.param("onnx", WHOLE, marks=needs_onnx),
        pytest.param("onnx", (), marks=needs_onnx),
    ],
    ids=["torchscript-whole", "onnx-whole", "onnx-slide"],
)
def test_segmenter_export_matches_eager_at_two_sizes(workdir, fmt, opts):
    exported = ExportedPredictor(_export(workdir, SEG, fmt, opts))
    eager = _eager(workdir, SEG, opts)
    # resized to short side 128: 128x170 and 213x128 (traced at 128x170)
    for h, w in [(150, 200), (300, 180)]:
        image = synthetic_image(h, w, seed=w)
        want, got = eager(image), exported(image)
        assert got["sem_seg"].shape == want["sem_seg"].shape == (6, h, w)
        comparison = compare_predictions(want, got)
        assert comparison.ok(), f"{h}x{w}: {comparison.summary()}"


def test_export_checks_itself_and_writes_the_manifest(workdir):
    out = os.path.join(workdir, "verified")
    result = export_from_config(SEG, out, fmt="torchscript", weights=_weights(workdir, SEG))
    assert [c.ok() for _, c in result.checks] == [True, True]
    assert result.checks[0][0] != result.checks[1][0]  # two sizes
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["export_format_version"] == EXPORT_FORMAT_VERSION
    assert manifest["format"] == "torchscript" and manifest["task"] == "sem_seg"
    assert manifest["config_kind"] == "yacs" and manifest["input_format"] == "RGB"
    assert manifest["class_names"][:2] == ["sky", "grass"] and manifest["num_classes"] == 6
    assert manifest["size_divisibility"] == 32 and manifest["min_image_side"] == 33
    assert manifest["sem_seg"] == {"mode": "slide", "crop_size": [128, 128], "stride": [85, 85]}
    assert manifest["test_resize"]["short_edge_length"] == [128, 128]
    assert manifest["files"]["model"]["path"] == "model.ts"
    assert _leftovers(workdir) == []


# ----------------------------------------------------------------------------- tracing
def _randomize_tables(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "relative_position" in name or "pos_embed" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def _backbones():
    from detectron2.modeling.backbone.vit import ViT

    from convmae_det.modeling.det_backbone import ConvViTDet
    from convmae_det.modeling.seg_backbone import ConvViTSeg

    small = dict(embed_dims=(16, 32, 64), depths=(1, 1, 3), num_heads=4)
    return {
        "paper-shared": lambda: ConvViTDet(
            **small, window_size=4, window_block_indexes=[1], rel_pos="shared",
            pos_embed_hw=(12, 12), rel_pos_hw=(12, 12),
        ),
        "vitdet-decomposed": lambda: ConvViTDet(
            **small, window_size=4, window_block_indexes=[0], rel_pos="decomposed",
            pos_embed_hw=(14, 14), rel_pos_hw=(12, 12), out_features=["e3"], e4_kind="none",
            mask_window_padding=False,
        ),
        "mae-vit": lambda: ViT(
            img_size=192, patch_size=16, embed_dim=64, depth=3, num_heads=4, window_size=4,
            window_block_indexes=[0], use_rel_pos=True, rel_pos_zero_init=False,
        ),
        "seg-per-block": lambda: ConvViTSeg(
            embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=2, pos_embed_hw=(8, 8),
            e4_norm="BN", drop_path_rate=0.0,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_backbones()))
def test_traced_backbones_follow_the_input_size(name):
    torch.manual_seed(0)
    model = _randomize_tables(_backbones()[name]())
    traced_at = torch.randn(1, 3, 192, 192)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the branches it freezes
        with traceable_shapes():
            traced = torch.jit.trace(model, traced_at, check_trace=False, strict=False)
        naive = torch.jit.trace(model, traced_at, check_trace=False, strict=False)
    naive_broken = False
    for h, w in [(224, 256), (96, 128)]:  # larger and smaller grids than the tables
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            want = model(x)
            got = traced(x)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
            try:
                bad = naive(x)
                naive_broken |= any(
                    bad[k].shape != want[k].shape or not torch.allclose(bad[k], want[k], atol=1e-4)
                    for k in want
                )
            except RuntimeError:
                naive_broken = True
    assert naive_broken, "a plain trace generalised: the size patches are no longer needed?"


def test_size_patches_leave_eager_results_alone():
    torch.manual_seed(0)
    model = _randomize_tables(_backbones()["paper-shared"]())
    x = torch.randn(1, 3, 224, 160)
    with torch.no_grad():
        want = model(x)
        with traceable_shapes():
            got = model(x)
    for key in want:
        assert torch.equal(got[key], want[key])


@pytest.mark.parametrize("hw", [(3, 3), (5, 7), (8, 8), (15, 4)])
def test_traced_adaptive_pool_matches_pytorch(hw):
    x = torch.randn(2, 3, *hw)
    for size in [2, 3, 6, (2, 5)]:
        pair = (size, size) if isinstance(size, int) else size
        want = nn.AdaptiveAvgPool2d(size)(x)
        torch.testing.assert_close(TracedAdaptiveAvgPool2d(pair)(x), want, rtol=1e-5, atol=1e-6)


def test_runner_window_grid_is_the_segmenters():
    from convmae_det.modeling.segmentor import sliding_window_boxes

    for h, w in [(128, 128), (128, 300), (512, 683), (100, 90)]:
        assert window_grid(h, w, (128, 128), (85, 85)) == sliding_window_boxes(
            h, w, (128, 128), (85, 85)
        )


# ----------------------------------------------------------------------------- bad input
def _leftovers(folder) -> list:
    return [n for n in os.listdir(folder) if n.startswith(".")]


def test_unsupported_option_is_named_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExportError, match="TEST.SEM_SEG.FLIP") as info:
        export_from_config(SEG, str(out), fmt="onnx", opts=["TEST.SEM_SEG.FLIP", "True"])
    assert info.value.option == "TEST.SEM_SEG.FLIP"
    with pytest.raises(UnsupportedExportError, match="model._target_"):
        export_from_config("configs/pretrain/convmae_toy.py", str(out), fmt="onnx")
    assert os.listdir(tmp_path) == []


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CONVMAE_DET_DEBUG"}
    return subprocess.run(
        [sys.executable, "tools/export_model.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip


def test_tool_user_mistakes_are_one_line_and_exit_2(tmp_path):
    out = str(tmp_path / "out")
    proc = _run_tool("--config-file", SEG, "--format", "onnx", "--output", out,
                     "TEST.SEM_SEG.SCALES", "[0.5, 1.0]")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "TEST.SEM_SEG.SCALES" in errors[0], proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    weights = str(tmp_path / "w.pth")
    cfg, kind = load_any_config(SEG)
    torch.save({"model": build_model_from_config(cfg, kind, device="cpu").state_dict()}, weights)
    out = str(tmp_path / "out")
    # the exported model disagrees with eager PyTorch: refused after the whole export ran
    monkeypatch.setattr(Comparison, "ok", lambda self, tol=None: False)
    with pytest.raises(ExportError, match="differs from eager PyTorch"):
        export_from_config(SEG, out, fmt="torchscript", weights=weights)
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]
    monkeypatch.undo()

    def broken_trace(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    deep = str(tmp_path / "new" / "folders" / "out")  # parents made for it go again too
    with pytest.raises(ExportError, match="frobnicate") as info:
        export_from_config(SEG, deep, fmt="torchscript", weights=weights)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]


def test_output_that_is_not_an_export_is_refused(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an exported model folder"):
        export_from_config(SEG, str(out), fmt="onnx")
    assert os.listdir(out) == ["keep.txt"] and _leftovers(tmp_path) == []


@needs_onnx
def test_reexport_replaces_an_earlier_export(workdir, tmp_path):
    out = tmp_path / "seg"
    shutil.copytree(_export(workdir, SEG, "onnx"), out)
    export_from_config(
        SEG, str(out), fmt="torchscript", weights=_weights(workdir, SEG), verify=False
    )
    assert sorted(os.listdir(out)) == ["manifest.json", "model.ts"]
    assert _leftovers(tmp_path) == []
    assert ExportedPredictor(str(out)).manifest.format == "torchscript"


def test_runner_refuses_broken_folders_in_one_line(workdir, tmp_path):
    src = _export(workdir, SEG, "torchscript", WHOLE)

    def fresh(name: str) -> str:
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        return dst

    def error(folder: str) -> str:
        with pytest.raises(ExportedModelError) as info:
            ExportedPredictor(folder)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "no such exported model folder" in error(str(tmp_path / "nothing"))
    folder = fresh("no_manifest")
    os.remove(os.path.join(folder, "manifest.json"))
    assert "no manifest.json" in error(folder)
    folder = fresh("other_version")
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    data["export_format_version"] = EXPORT_FORMAT_VERSION + 1
    with open(path, "w") as f:
        json.dump(data, f)
    assert f"version {EXPORT_FORMAT_VERSION + 1}" in error(folder)
    folder = fresh("missing_graph")
    os.remove(os.path.join(folder, "model.ts"))
    assert "missing file model.ts" in error(folder)
    folder = fresh("truncated_graph")
    with open(os.path.join(folder, "model.ts"), "r+b") as f:
        f.truncate(1000)
    assert "truncated" in error(folder)


def test_runner_names_the_sizes_it_takes(workdir):
    exported = ExportedPredictor(_export(workdir, SEG, "torchscript", WHOLE))
    # short side 128 would make the long side 12800 > 512: rescaled to 5x512
    with pytest.raises(ValueError, match=">= 33 px"):
        exported(np.zeros((10, 1000, 3), np.uint8))


@pytest.mark.parametrize("fmt", ["torchscript", ONNX])
def test_runner_runs_without_the_model_code(workdir, fmt):
    folder = _export(workdir, DET, fmt)
    code = (
        "import sys, numpy as np\n"
        "from convmae_det.deploy.runner import ExportedPredictor\n"
        f"out = ExportedPredictor({folder!r})(np.full((160, 200, 3), 90, np.uint8))\n"
        "assert 'instances' in out\n"
        "loaded = [m for m in sys.modules if m.startswith(('convmae_det.modeling', "
        "'convmae_det.engine', 'convmae_det.model_from_config'))]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- tools on exports
def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CONVMAE_DET_DEBUG"}
    return subprocess.run(
        [sys.executable, os.path.join("tools", script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def _instance_lines(stdout: str) -> Dict[str, str]:
    """ "img.png: 3 instances >= 0.50 (2 star, 1 cross), 0.12 s -> out" -> {"img.png": "3 ..."}."""
    lines = {}
    for line in stdout.splitlines():
        if " instance" in line and " -> " in line:
            name, rest = line.split(": ", 1)
            lines[os.path.basename(name)] = rest.rsplit(", ", 1)[0]  # without the time
    return lines


def test_demo_draws_from_an_export_what_eager_draws(workdir, tmp_path):
    from PIL import Image

    folder = _export(workdir, DET, "torchscript")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (h, w) in enumerate([(160, 200), (192, 256)]):
        Image.fromarray(synthetic_image(h, w, seed=i)).save(inputs / f"img{i}.png")
    exported = _run("demo.py", "--exported", folder, "--input", str(inputs),
                    "--output", str(tmp_path / "exp"))  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "exported torchscript instances model" in exported.stdout
    assert "inference: exported TorchScript" in exported.stdout
    assert "summary: 2 images drawn" in exported.stdout
    assert sorted(os.listdir(tmp_path / "exp")) == ["img0.png", "img1.png"]
    eager = _run("demo.py", "--config-file", DET, "--weights", _weights(workdir, DET),
                 "--input", str(inputs), "--output", str(tmp_path / "eager"))  # fmt: skip
    assert eager.returncode == 0, eager.stderr[-3000:]
    got, want = _instance_lines(exported.stdout), _instance_lines(eager.stdout)
    assert set(got) == {"img0.png", "img1.png"} and got == want
    assert any(not v.startswith("0 instances") for v in got.values()), got


def test_demo_skips_sizes_the_export_refuses_and_refuses_eager_options(workdir, tmp_path):
    from PIL import Image

    folder = _export(workdir, SEG, "torchscript", WHOLE)
    Image.fromarray(synthetic_image(128, 170)).save(tmp_path / "ok.png")
    Image.fromarray(np.zeros((10, 1000, 3), np.uint8)).save(tmp_path / "thin.png")
    proc = _run("demo.py", "--exported", folder, "--input", str(tmp_path / "ok.png"),
                str(tmp_path / "thin.png"), "--output", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summary: 1 images drawn" in proc.stdout
    assert "skipped" in proc.stderr and "thin.png" in proc.stderr and ">= 33 px" in proc.stderr
    assert os.listdir(tmp_path / "out") == ["ok.png"]
    for extra, named in [
        (["--weights", "w.pth"], "--weights"),
        (["--dtype", "bf16"], "--dtype bf16"),
        (["--plain"], "--plain"),
        (["--opts", "MODEL.WEIGHTS", "w.pth"], "--opts"),
    ]:
        proc = _run("demo.py", "--exported", folder, "--input", str(tmp_path / "ok.png"), *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().startswith("error: --exported") and named in proc.stderr
    proc = _run("demo.py", "--exported", str(tmp_path / "none"), "--input", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {tmp_path / 'none'}: no such exported model folder"
    ), proc.stderr[-2000:]


def test_benchmark_times_an_export_against_eager(workdir, tmp_path):
    folder = _export(workdir, SEG, "torchscript", WHOLE)
    out = tmp_path / "bench.json"
    proc = _run("benchmark.py", "--exported", folder, "--mode", "inference", "--iters", "2",
                "--warmup", "0", "--threads", "1", "--size", "96x128", "--output", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        result = json.load(f)
    assert result["format"] == "torchscript" and result["config_file"] == SEG
    assert result["image_size"] == [96, 128] and result["threads"] == 1 and result["rounds"] == 2
    for name in ("eager", "torchscript"):
        assert len(result["timings"][name]["samples_ms"]) == 2
        assert result["timings"][name]["min_ms"] > 0
    eager, graph = result["timings"]["eager"], result["timings"]["torchscript"]
    assert result["speedup_median"] == pytest.approx(eager["median_ms"] / graph["median_ms"])
    assert "x eager by median" in proc.stdout
    for extra, named in [
        (["--mode", "train"], "--mode train"),
        (["--dtype", "bf16"], "--dtype bf16"),
        (["--iters", "0"], "--iters 0"),
    ]:
        proc = _run("benchmark.py", "--exported", folder, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().startswith("benchmark: ") and named in proc.stderr
    proc = _run("benchmark.py", "--exported", str(tmp_path / "none"))
    assert proc.returncode == 2 and "no such exported model folder" in proc.stderr
