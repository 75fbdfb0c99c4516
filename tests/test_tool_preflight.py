"""Every tool refuses a user mistake with one line and exit code 2, before building a model;
CONVMAE_DET_DEBUG=1 shows the traceback instead."""

import os
import subprocess
import sys

import pytest
import torch

from convmae_det.engine import preflight
from convmae_det.engine.preflight import (
    check_data_dir,
    check_output_dir,
    check_weights_file,
    debug_mode,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET = "configs/toy/mask_rcnn_convvitdet_toy.py"
SEG = "configs/ADE20K/upernet_convmae_toy.yaml"
PRE = "configs/pretrain/fastconvmae_toy.py"


def _run(args, env=None, timeout=240):
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k != "CONVMAE_DET_DEBUG"}
    env.update(extra)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip


def _one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    return str(path)


@pytest.mark.parametrize(
    "tool, make_args, key",
    [
        ("lazyconfig_train_net.py", lambda f: ["--config-file", DET, f"train.output_dir={f}/out"],
         "train.output_dir"),
        ("plain_train_net.py", lambda f: ["--config-file", SEG, "OUTPUT_DIR", f"{f}/out"],
         "OUTPUT_DIR"),
        ("pretrain.py", lambda f: ["--config-file", PRE, f"train.output_dir={f}/out"],
         "train.output_dir"),
        ("convert_checkpoint.py", lambda f: [f, f"{f}/out/x.pth"], "DST"),
        ("visualize_pretrain.py", lambda f: ["--checkpoint", f, "--input", f, "--output",
                                             f"{f}/out"], "--output"),
    ],
    ids=["detection", "segmentation", "pretraining", "convert", "visualize_pretrain"],
)  # fmt: skip
def test_an_output_folder_that_cannot_be_written_is_one_line_naming_the_key(
    a_file, tool, make_args, key
):
    line = _one_error_line(_run([f"tools/{tool}", *make_args(a_file)]))
    assert line.startswith(f"error: {key}") and "cannot write the output folder" in line
    assert f"{a_file} is a file, not a folder" in line


def test_missing_weights_and_data_are_named_before_anything_is_built(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    seg = _run(["tools/plain_train_net.py", "--config-file", SEG, "MODEL.WEIGHTS", missing,
                "OUTPUT_DIR", str(tmp_path / "seg")])  # fmt: skip
    assert _one_error_line(seg) == f"error: MODEL.WEIGHTS: no such checkpoint file: {missing}"
    assert "Model:" not in seg.stdout + seg.stderr  # no model was built (or dumped)
    pre = _run(["tools/pretrain.py", "--config-file", PRE, f"train.data_path={tmp_path}/no",
                f"train.output_dir={tmp_path}/pre"])  # fmt: skip
    line = _one_error_line(pre)
    assert line.startswith("error: train.data_path (--data-path):") and "does not exist" in line
    pre = _run(["tools/pretrain.py", "--config-file", PRE, f"train.init_checkpoint={missing}",
                f"train.output_dir={tmp_path}/pre"])  # fmt: skip
    assert (
        _one_error_line(pre) == f"error: train.init_checkpoint: no such checkpoint file: {missing}"
    )
    assert not (tmp_path / "seg").exists() and not (tmp_path / "pre").exists()


def test_debug_environment_variable_shows_the_traceback(a_file):
    args = ["tools/lazyconfig_train_net.py", "--config-file", DET, f"train.output_dir={a_file}/o"]
    quiet = _run(args)
    _one_error_line(quiet)
    loud = _run(args, env={"CONVMAE_DET_DEBUG": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr
    assert "cannot write the output folder" in loud.stderr


def test_debug_mode_values(monkeypatch):
    for value, expected in [("", False), ("0", False), ("no", False), ("1", True), ("yes", True)]:
        monkeypatch.setenv("CONVMAE_DET_DEBUG", value)
        assert debug_mode() is expected


def test_output_folder_checks_without_creating_anything(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b" / "c"
    check_output_dir("OUTPUT_DIR", str(target))  # creatable: fine
    assert not (tmp_path / "a").exists()  # nothing created by the check
    check_output_dir("OUTPUT_DIR", "")  # no folder configured: nothing to check
    # a folder we may not write into (root ignores permission bits, so os.access is faked)
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: path != str(tmp_path))
    with pytest.raises(ValueError, match=f"OUTPUT_DIR: cannot write the output folder {target}: "
                       f"no permission to write in {tmp_path}"):  # fmt: skip
        check_output_dir("OUTPUT_DIR", str(target))


def test_weights_and_data_checks(tmp_path):
    check_weights_file("MODEL.WEIGHTS", "")
    check_weights_file("MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    with pytest.raises(FileNotFoundError, match="is a folder; expected a checkpoint file"):
        check_weights_file("MODEL.WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train.data_path: .* is a file"):
        (tmp_path / "f").write_text("x")
        check_data_dir("train.data_path", str(tmp_path / "f"))
    check_data_dir("train.data_path", None)
    check_data_dir("train.data_path", str(tmp_path))


def test_a_failed_checkpoint_save_in_a_training_process_is_one_line_and_exit_1(capsys):
    import errno

    from convmae_det.checkpoint import CheckpointWriteError
    from convmae_det.engine.launcher import _run_process

    message = "no space left on device while writing out/model_0000009.pth; the previous checkpoint out/model_0000004.pth is intact"  # noqa: E501

    def main(args):
        raise CheckpointWriteError(errno.ENOSPC, message)

    with pytest.raises(SystemExit) as exit_info:
        _run_process(main, None)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"
