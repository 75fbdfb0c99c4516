"""The everyday tools of a detectron2 user, run as a user runs them (subprocesses): drawing the
training data (tools/visualize_data.py), model statistics (tools/analyze_model.py), and the toy
Mixture-of-Reconstructors pretraining with DINO- and CLIP-style teachers from local files
(configs/pretrain/fastconvmae_mor_toy.py through tools/pretrain.py).

Toy data only (the 16-image toy shapes split and the toy ADE20K in a temporary
``DETECTRON2_DATASETS``), toy models, one CPU thread per tool.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from convmae_det.data.datasets.ade20k import datasets_root, register_toy_ade20k
from convmae_det.data.datasets.toy_coco import register_toy_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET_TOY = os.path.join(ROOT, "configs", "toy", "mask_rcnn_convvitdet_toy.py")
SEG_TOY = os.path.join(ROOT, "configs", "ADE20K", "upernet_convmae_toy.yaml")
MOR_TOY = os.path.join(ROOT, "configs", "pretrain", "fastconvmae_mor_toy.py")
MINI = [f"dataloader.{split}.dataset.names=toy_coco_mini" for split in ("train", "test")]
SEG_TRAIN = "toy_ade20k_sem_seg_train"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The toy shapes mini split and the toy ADE20K, generated once under a temporary root that
    the tools get as ``DETECTRON2_DATASETS``; the default registrations are restored after."""
    from detectron2.data import DatasetCatalog

    root = str(tmp_path_factory.mktemp("d2data"))
    register_toy_coco(["toy_coco_mini"], root=os.path.join(root, "toy_coco"))
    register_toy_ade20k(root)
    DatasetCatalog.get("toy_coco_mini")
    DatasetCatalog.get(SEG_TRAIN)  # generates both toy ADE20K splits
    yield root
    register_toy_coco(["toy_coco_mini"])
    register_toy_ade20k(datasets_root())


def run(tool: str, args: List[str], data_root: str, timeout: int = 600):
    env = {**os.environ, "DETECTRON2_DATASETS": data_root, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", tool)] + list(args),
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


def _records(name: str) -> List[Dict]:
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get(name)


def _png(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# --------------------------------------------------------------------------- visualize_data
IMAGE_LINE = re.compile(r"^(\S+\.png): (\S+) (?:mapped to )?(\d+)x(\d+), (.+)$")


def _drawn(proc, out_dir: str, expected: int) -> List[tuple]:
    """(png path, source file, width, height, description) of every line the tool printed,
    checked against the files in ``out_dir`` and the summary line."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [IMAGE_LINE.match(x) for x in proc.stdout.splitlines()]
    rows = [(m[1], m[2], int(m[3]), int(m[4]), m[5]) for m in lines if m]
    assert len(rows) == expected, proc.stdout
    assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(r[0]) for r in rows)
    assert f"wrote {expected} images" in proc.stdout.splitlines()[-1]
    for path, _, w, h, _ in rows:
        png = _png(path)
        assert png.shape[:2] == (h, w), path  # scale 1: the size of the drawn image
        assert png.std() > 10, f"{path} looks blank"
    return rows


@pytest.mark.parametrize("source", ["annotation", "dataloader"])
def test_visualize_data_detection_lazyconfig(tmp_path, data_root, source):
    out = str(tmp_path / "vis")
    args = ["--config-file", DET_TOY, "--source", source, "--output-dir", out]
    proc = run("visualize_data.py", args + ["--num-images", "3"] + MINI, data_root)
    rows = _drawn(proc, out, 3)
    assert all(r[4].endswith("instances") for r in rows)
    assert sum(int(r[4].split()[0]) for r in rows) > 0
    if source == "annotation":  # the first records, at their size, with something drawn on them
        for (path, file_name, w, h, _), record in zip(rows, _records("toy_coco_mini")):
            assert file_name == record["file_name"]
            assert (w, h) == (record["width"], record["height"])
            raw = _png(file_name).astype(np.float64)
            assert np.abs(_png(path) - raw).mean() > 2.0, "no annotation drawn"
    else:  # scaled-down LSJ: resized by 0.6-1.6 and cropped to at most 192 x 192
        assert all(w <= 192 and h <= 192 for _, _, w, h, _ in rows)


@pytest.mark.parametrize("source", ["annotation", "dataloader"])
def test_visualize_data_segmentation_yacs(tmp_path, data_root, source):
    out = str(tmp_path / "vis")
    args = ["--config-file", SEG_TOY, "--source", source, "--output-dir", out, "--num-images", "2"]
    proc = run("visualize_data.py", args + ["SEED", "0"], data_root)
    rows = _drawn(proc, out, 2)
    if source == "annotation":
        for (path, file_name, w, h, what), record in zip(rows, _records(SEG_TRAIN)):
            raw = _png(record["file_name"])
            assert file_name == record["file_name"] and raw.shape[:2] == (h, w)
            assert what.startswith("labels ")
            assert np.abs(_png(path) - raw.astype(np.float64)).mean() > 2.0, "no labels drawn"
    else:  # crops of INPUT.SEM_SEG.CROP_SIZE (padded when smaller), named classes drawn
        assert all((w, h) == (128, 128) for _, _, w, h, _ in rows)
        assert all(re.match(r"\d+ classes \(", r[4]) for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-file", "configs/toy/no_such_config.py"], "no_such_config.py: no such config file"),
        (["--config-file", DET_TOY, "train.max_iters=3"], "unknown config key 'train.max_iters'"),
        (["--config-file", DET_TOY, "dataloader.train.dataset.names=toy_coco_typo"],
         "dataset 'toy_coco_typo'"),
        (["--config-file", SEG_TOY, "SOLVER.MAX_ITER", "abc"], "SOLVER.MAX_ITER"),
    ],
)  # fmt: skip
def test_visualize_data_user_errors_are_one_line_exit_2(tmp_path, data_root, args, message):
    out = str(tmp_path / "vis")
    proc = run(
        "visualize_data.py", ["--source", "annotation", "--output-dir", out] + args, data_root
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not os.path.exists(out) or not os.listdir(out)


# ---------------------------------------------------------------------------- analyze_model
def _built_model(config: str, opts: List[str]):
    from convmae_det.model_from_config import build_model_from_config, load_any_config

    cfg, kind = load_any_config(config, opts)
    return build_model_from_config(cfg, kind, device="cpu")


def _check_parameters(result: Dict, model: torch.nn.Module) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["total"] == total and result["trainable"] == trainable
    children = {n: sum(p.numel() for p in c.parameters()) for n, c in model.named_children()}
    assert {k: v["total"] for k, v in result["by_module"].items()} == {
        k: v for k, v in children.items() if v
    }
    assert sum(v["total"] for v in result["by_module"].values()) == total


def test_analyze_model_segmentation_parameters_structure_and_flops_match_benchmark(
    tmp_path, data_root
):
    from convmae_det.benchmark import BenchmarkConfig, run_benchmark

    out = str(tmp_path / "analysis.json")
    args = ["--config-file", SEG_TOY, "--tasks", "parameter", "structure", "flop"]
    proc = run("analyze_model.py", args + ["--synthetic", "--output", out], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    _check_parameters(result["parameters"], _built_model(SEG_TOY, []))
    assert f"Total parameters: {result['parameters']['total']}" in proc.stdout
    assert "Model structure:" in proc.stdout and "(sem_seg_head)" in proc.stdout
    assert result["inputs"] == "synthetic 128x128 input"  # INPUT.SEM_SEG.CROP_SIZE
    flops = result["flops"]
    fvcore, counted = flops["fvcore_total"]["mean"], flops["benchmark_total"]["mean"]
    assert fvcore > 0 and counted > 0
    # tools/benchmark.py's count of the same model on the same synthetic image
    bench = run_benchmark(
        BenchmarkConfig(
            config_file=SEG_TOY, mode="inference", image_size=(128, 128), device="cpu",
            warmup=0, iters=1, peak_tflops=0,
        )
    )  # fmt: skip
    assert counted == bench["flops_per_img"]
    # fvcore counts a multiply-add once, plus norms and resizes the benchmark leaves out
    assert 0.97 < 2 * fvcore / bench["flops_per_img"] < 1.05


def test_analyze_model_detector_on_toy_images(tmp_path, data_root):
    out = str(tmp_path / "analysis.json")
    args = ["--config-file", DET_TOY, "--tasks", "parameter", "flop", "activation", "-n", "2"]
    proc = run("analyze_model.py", args + ["--output", out] + MINI, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    _check_parameters(result["parameters"], _built_model(DET_TOY, []))
    assert result["inputs"] == "2 image(s) of toy_coco_mini"
    flops = result["flops"]
    assert flops["num_inputs"] == 2
    fvcore, counted = flops["fvcore_total"]["mean"], flops["benchmark_total"]["mean"]
    assert fvcore > 0 and 0.97 < 2 * fvcore / counted < 1.05  # same inputs, two counters
    assert flops["fvcore_by_operator"]["scaled_dot_product_attention"] > 0  # counted for fvcore
    assert sum(flops["fvcore_by_module"].values()) == pytest.approx(fvcore, rel=1e-6)
    assert set(flops["fvcore_by_module"]) == {"backbone", "proposal_generator", "roi_heads"}
    assert result["activations"]["total"]["mean"] > 0
    assert re.search(r"Total GFLOPs \(fvcore, 1 per multiply-add\): \d+\.\d+", proc.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-file", DET_TOY, "--tasks", "flops"], "invalid choice: 'flops'"),
        (["--config-file", DET_TOY, "--tasks", "parameter", "train.max_iters=1"],
         "error: unknown config key 'train.max_iters'"),
        (["--config-file", SEG_TOY, "--tasks", "flop", "DATASETS.TEST", "('ade20k_sem_seg_val',)"],
         "--synthetic"),
    ],
)  # fmt: skip
def test_analyze_model_user_errors_exit_2(data_root, args, message):
    proc = run("analyze_model.py", args, data_root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------- toy MoR pretraining
TEACHER_KW = dict(embed_dim=32, depth=1, num_heads=2, img_size=64)


def _teacher_files(folder) -> Dict[str, str]:
    """A tiny DINO ViT-S/8 saved as DINO's training checkpoints are (``teacher`` with
    ``module.backbone.`` keys and the projection head) and a tiny CLIP ViT-B/16 image tower as a
    timm state dict; random weights, the timm architectures of the published teachers."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    dino = timm.create_model(
        "vit_small_patch8_224.dino", pretrained=False, num_classes=0, **TEACHER_KW
    )
    wrapped = {f"module.backbone.{k}": v for k, v in dino.state_dict().items()}
    wrapped["module.head.last_layer.weight"] = torch.zeros(4, 4)
    clip = timm.create_model(
        "vit_base_patch16_clip_224.openai", pretrained=False, num_classes=0, **TEACHER_KW
    )
    paths = {"dino": str(folder / "dino_tiny.pth"), "clip": str(folder / "clip_tiny.pth")}
    torch.save({"teacher": wrapped, "epoch": 1}, paths["dino"])
    torch.save(clip.state_dict(), paths["clip"])
    return paths


def test_toy_mor_pretraining_with_dino_and_clip_teachers(tmp_path, data_root):
    from convmae_det.engine.pretrain_data import generate_toy_images

    files = _teacher_files(tmp_path)
    images = str(tmp_path / "images")
    generate_toy_images(images, num_images=16, size=72)
    kw = "model_kwargs: {embed_dim: 32, depth: 1, num_heads: 2, img_size: 64}"
    dino = f"{{name: dino, arch: vit_small_patch8_224.dino, checkpoint: '{files['dino']}', {kw}}}"
    clip = (
        f"{{name: clip, arch: vit_base_patch16_clip_224.openai, checkpoint: '{files['clip']}', "
        f"weight: 0.5, {kw}}}"
    )
    out = tmp_path / "run"
    args = ["--config-file", MOR_TOY, "--data-path", images, "--output-dir", str(out)]
    args += ["train.epochs=1", "train.batch_size=8", "train.log_period=1"]  # 2 iterations
    proc = run("pretrain.py", args + [f"model.mor.teachers=[{dino}, {clip}]"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ckpt = torch.load(out / "checkpoint-0000.pth", map_location="cpu", weights_only=True)
    keys = set(ckpt["model"])
    for target in ("ema", "dino", "clip"):
        assert f"mor.heads.{target}.pred.weight" in keys
    assert ckpt["model"]["mor.heads.dino.pred.weight"].shape[0] == TEACHER_KW["embed_dim"]
    assert any(k.startswith("mor.ema.encoder.") for k in keys)
    assert all(k.startswith("mor.heads.") for k in keys if "dino" in k or "clip" in k)
    assert ckpt["args"]["model"]["name"] == "fastconvmae_toy"

    lines = [json.loads(x) for x in open(out / "metrics.json")]
    assert [x["iteration"] for x in lines] == [0, 1]
    for x in lines:
        terms = {k: x[k] for k in ("loss_pixel", "loss_ema", "loss_dino", "loss_clip")}
        assert all(math.isfinite(v) and v > 0 for v in terms.values()), x
        weighted = terms["loss_pixel"] + terms["loss_ema"] + terms["loss_dino"]
        assert x["total_loss"] == pytest.approx(weighted + 0.5 * terms["loss_clip"], rel=1e-5)
