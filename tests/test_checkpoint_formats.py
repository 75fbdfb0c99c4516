"""Reading, detecting and mapping every supported checkpoint format (small fake files)."""

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from convmae_det.checkpoint import (
    CheckpointError,
    ConvMAECheckpointer,
    convert_checkpoint,
    detect_format,
    extract_encoder,
    load_checkpoint_file,
    unwrap_checkpoint,
)
from convmae_det.modeling import ConvViT
from tests.conftest import ROOT, tiny_convvit_kwargs


def encoder_state(**kw):
    return {
        k: torch.randn_like(v) for k, v in ConvViT(**tiny_convvit_kwargs(**kw)).state_dict().items()
    }


def pretrain_state():
    """Official full pretraining layout (tiny widths): encoder + norm + decoder + fusion."""
    sd = encoder_state(final_norm=True)
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_pos_embed"] = torch.zeros(1, 196, 16)
    sd["decoder_embed.weight"] = torch.randn(16, 64)
    sd["decoder_blocks.0.attn.qkv.weight"] = torch.randn(48, 16)
    sd["decoder_norm.weight"] = torch.ones(16)
    sd["decoder_pred.weight"] = torch.randn(768, 16)
    sd["stage1_output_decode.weight"] = torch.randn(64, 32, 4, 4)
    sd["stage2_output_decode.weight"] = torch.randn(64, 48, 2, 2)
    return sd


def detector_encoder():
    return ConvViT(
        **tiny_convvit_kwargs(
            window_size=4,
            window_block_indexes=[1],
            rel_pos="shared",
            rel_pos_hw=(8, 8),
            pos_embed_hw=(8, 8),
        )
    )


def save(tmp_path, obj, name="ckpt.pth"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


FORMATS = {
    "convmae_pretrain": lambda: {
        "model": pretrain_state(),
        "epoch": 1599,
        "args": argparse.Namespace(lr=1),
    },
    "convvit_encoder": lambda: {"model": encoder_state()},  # released file: decoder stripped
    "convmae_v2_encoder": lambda: {
        "model": {**encoder_state(), "cls_token": torch.zeros(1, 1, 64)}
    },
    "easycv_convvit": lambda: {
        "state_dict": {"backbone." + k: v for k, v in encoder_state().items()}
    },
    "convvit_imagenet_finetune": lambda: {
        "model": {
            **encoder_state(),
            "fc_norm.weight": torch.ones(64),
            "head.weight": torch.randn(10, 64),
        }
    },
    "detectron2_convvitdet_fpn": lambda: {
        "model": {"backbone.bottom_up." + k: v for k, v in detector_encoder().state_dict().items()}
    },
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_is_detected(tmp_path, fmt):
    ckpt = load_checkpoint_file(save(tmp_path, FORMATS[fmt]()))
    assert detect_format(unwrap_checkpoint(ckpt)) == fmt


def test_easycv_prefixes_and_ddp_module_prefix_are_understood(tmp_path):
    enc = encoder_state()
    for prefix in ("encoder.", "module.backbone.", "module."):
        ckpt = {"state_dict": {prefix + k: v for k, v in enc.items()}}
        state, report = convert_checkpoint(ckpt, ConvViT(**tiny_convvit_kwargs()))
        assert report.problems == 0 and len(report.loaded) == len(enc), prefix
        assert torch.equal(state["blocks3.2.attn.qkv.weight"], enc["blocks3.2.attn.qkv.weight"])


def test_mae_vit_format_is_detected_and_loads_into_a_vit(tmp_path):
    from detectron2.modeling import ViT

    vit = ViT(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        window_size=0,
        use_rel_pos=False,
    )
    sd = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    sd.update(
        cls_token=torch.zeros(1, 1, 32),
        **{"norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)},
    )
    sd["decoder_embed.weight"] = torch.zeros(8, 32)
    ckpt = {"model": sd}
    assert detect_format(ckpt["model"]) == "mae_vit"

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.net = vit

    state, report = convert_checkpoint(ckpt, Wrapper())
    assert report.missing == [] and report.unexpected == []
    assert set(report.ignored) == {
        "cls token",
        "final norm (downstream models have none)",
        "pretraining decoder",
    }
    assert torch.equal(state["backbone.net.pos_embed"], sd["pos_embed"])


def test_pretraining_checkpoint_into_detector_encoder_resizes_and_reports(tmp_path):
    path = save(tmp_path, FORMATS["convmae_pretrain"]())
    state, report = convert_checkpoint(load_checkpoint_file(path), detector_encoder(), source=path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.resized == [("pos_embed", (1, 196, 64), (1, 64, 64))]
    assert set(report.ignored) == {
        "final norm (downstream models have none)",
        "pretraining decoder",
        "pretraining multi-scale fusion",
    }
    tables = report.initialised["relative positions / layer scale (zero or 1.0 init)"]
    assert sorted(tables) == [
        "global_rel_pos_bias.relative_position_bias_table",
        "windowed_rel_pos_bias.relative_position_bias_table",
    ]
    text = report.summary()
    assert "loaded: " in text and "intentionally ignored: 10" in text and "missing: 0" in text


def test_mae_cls_position_is_dropped_before_resizing():
    enc = encoder_state()
    pos = torch.randn(1, 197, 64)
    enc["pos_embed"] = pos
    state, report = convert_checkpoint({"model": enc}, detector_encoder())
    from convmae_det.modeling.position import resize_pos_embed

    assert torch.allclose(state["pos_embed"], resize_pos_embed(pos[:, 1:], (14, 14), (8, 8)))


def test_strict_mode_fails_on_a_checkpoint_for_the_wrong_variant():
    decomposed = ConvViT(
        **tiny_convvit_kwargs(
            window_size=4, window_block_indexes=[1], rel_pos="decomposed", rel_pos_hw=(8, 8)
        )
    )
    ckpt = {"model": {k: torch.randn_like(v) for k, v in decomposed.state_dict().items()}}
    _, report = convert_checkpoint(ckpt, detector_encoder())
    assert any("rel_pos_h" in k for k in report.unexpected)
    with pytest.raises(CheckpointError, match="strict loading failed"):
        convert_checkpoint(ckpt, detector_encoder(), strict=True)


def test_shape_mismatch_is_reported_not_loaded():
    enc = encoder_state()
    enc["blocks3.0.mlp.fc1.weight"] = torch.randn(7, 64)
    state, report = convert_checkpoint({"model": enc}, ConvViT(**tiny_convvit_kwargs()))
    assert report.mismatched == [("blocks3.0.mlp.fc1.weight", (7, 64), (256, 64))]
    assert "blocks3.0.mlp.fc1.weight" not in state


def test_extract_encoder_without_target_drops_pretraining_parts():
    state, report = extract_encoder({"model": pretrain_state()})
    assert sorted(state) == sorted(encoder_state())
    assert "pretraining decoder" in report.ignored


def test_detectron2_pkl_with_numpy_arrays_loads_without_unrestricted_pickle(tmp_path):
    enc = {k: v.numpy() for k, v in encoder_state().items()}
    path = str(tmp_path / "model_final.pkl")
    with open(path, "wb") as f:
        pickle.dump(
            {"model": {"backbone.bottom_up." + k: v for k, v in enc.items()}, "__author__": "x"}, f
        )
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.bottom_up = ConvViT(**tiny_convvit_kwargs())
    ckpt = ConvMAECheckpointer(model)
    ckpt.load(path)
    assert ckpt.last_report.problems == 0
    assert np.allclose(model.backbone.bottom_up.pos_embed.detach().numpy(), enc["pos_embed"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = save(tmp_path, {"model": encoder_state(), "payload": _Evil(marker)})
    with pytest.raises(CheckpointError, match="refused to load.*system"):
        load_checkpoint_file(path)
    assert not marker.exists()
    pkl = str(tmp_path / "evil.pkl")
    with open(pkl, "wb") as f:
        pickle.dump({"model": {}, "payload": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint_file(pkl)
    assert not marker.exists()


def test_unsafe_opt_in_loads_trusted_legacy_objects(tmp_path):
    path = save(tmp_path, {"model": encoder_state(), "extra": argparse.ArgumentParser})
    with pytest.raises(CheckpointError):
        load_checkpoint_file(path)
    assert "model" in load_checkpoint_file(path, allow_unsafe=True)


def test_argparse_namespace_args_are_allowed_by_default(tmp_path):
    path = save(tmp_path, FORMATS["convmae_pretrain"]())
    assert load_checkpoint_file(path)["args"].lr == 1


@pytest.mark.parametrize("cut", [0, 10, 5000])
def test_truncated_or_garbage_file_names_the_file(tmp_path, cut):
    full = save(tmp_path, {"model": encoder_state()})
    bad = str(tmp_path / "bad.pth")
    with open(full, "rb") as f, open(bad, "wb") as g:
        g.write(f.read()[:cut])
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_checkpoint_file(bad)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_checkpoint_file(str(text))


def test_atomic_writes_give_files_the_usual_permissions(tmp_path):
    from convmae_det.checkpoint.io import save_checkpoint_atomic, write_text_atomic

    old = os.umask(0o022)
    try:
        save_checkpoint_atomic({"x": torch.ones(2)}, str(tmp_path / "a.pth"))
        write_text_atomic("a.pth", str(tmp_path / "last_checkpoint"))
    finally:
        os.umask(old)
    for name in ("a.pth", "last_checkpoint"):  # 0o644 like open(), not mkstemp's 0o600
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644
    assert torch.equal(torch.load(tmp_path / "a.pth")["x"], torch.ones(2))
    assert (tmp_path / "last_checkpoint").read_text() == "a.pth"
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "last_checkpoint"]  # no temporary left


def test_checkpointer_saves_atomically_and_resumes(tmp_path):
    model = ConvViT(**tiny_convvit_kwargs())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = ConvMAECheckpointer(model, str(tmp_path), optimizer=opt)
    ck.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    other = ConvViT(**tiny_convvit_kwargs())
    extra = ConvMAECheckpointer(
        other, str(tmp_path), optimizer=torch.optim.SGD(other.parameters(), lr=0.1)
    ).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    assert torch.equal(other.pos_embed, model.pos_embed)


def test_converted_file_loads_with_plain_detectron2_checkpointer(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    src = save(tmp_path, FORMATS["convmae_pretrain"]())
    target = detector_encoder()
    state, _ = convert_checkpoint(load_checkpoint_file(src), target)
    dst = save(tmp_path, {"model": state, "__author__": "convmae_det"}, "dst.pth")
    fresh = detector_encoder()
    DetectionCheckpointer(fresh).load(dst)
    assert torch.equal(fresh.blocks3[0].attn.qkv.weight, state["blocks3.0.attn.qkv.weight"])


def test_convert_tool_prints_the_report_for_an_official_checkpoint(tmp_path):
    from convmae_det.modeling import ConvViT as Base

    full = {k: torch.randn_like(v) for k, v in Base(final_norm=True).state_dict().items()}
    full["mask_token"] = torch.zeros(1, 1, 512)
    full["decoder_embed.weight"] = torch.zeros(512, 768)
    src = save(
        tmp_path, {"model": full, "epoch": 1599, "args": argparse.Namespace(model="convmae")}
    )
    dst = str(tmp_path / "encoder.pth")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), src, dst, "--strict"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "format: convmae_pretrain" in proc.stdout and "loaded: 203" in proc.stdout
    assert "pretraining decoder: 2" in proc.stdout
    out = torch.load(dst, weights_only=True)
    assert len(out["model"]) == 203

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), str(tmp_path / "nope.pth"), dst],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "nope.pth: no such checkpoint file" in proc.stderr
