"""Each compatibility fix for the pinned detectron2 snapshot, shown to be needed and to work."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT


def run_python(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


MODEL_ZOO_WITHOUT_PKG_RESOURCES = """
import sys
sys.modules["pkg_resources"] = None  # as on setuptools >= 82
{prelude}
from detectron2 import model_zoo
path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
import os; assert os.path.isfile(path), path
print("OK", path)
"""


def test_model_zoo_imports_without_pkg_resources_thanks_to_the_shim():
    broken = run_python(MODEL_ZOO_WITHOUT_PKG_RESOURCES.format(prelude=""))
    assert broken.returncode != 0 and "pkg_resources" in broken.stderr
    fixed = run_python(MODEL_ZOO_WITHOUT_PKG_RESOURCES.format(prelude="import convmae_det"))
    assert fixed.returncode == 0, fixed.stderr
    assert "OK" in fixed.stdout


SEM_SEG_EVAL = """
import numpy as np, torch
from PIL import Image
{prelude}
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator

gt = np.array([[0, 1, 1, 255], [2, 2, 1, 0]], dtype=np.uint8)
path = {path!r}
Image.fromarray(gt).save(path)
DatasetCatalog.register("d", lambda: [{{"file_name": path, "sem_seg_file_name": path}}])
MetadataCatalog.get("d").set(stuff_classes=["a", "b", "c"], ignore_label=255)
evaluator = SemSegEvaluator("d", distributed=False)
evaluator.reset()
pred = torch.nn.functional.one_hot(torch.from_numpy(gt.astype(np.int64)).clamp(max=2), 3)
evaluator.process([{{"file_name": path}}], [{{"sem_seg": pred.permute(2, 0, 1).float()}}])
print("mIoU", evaluator.evaluate()["sem_seg"]["mIoU"])
"""


def test_sem_seg_evaluator_reads_labels_under_numpy_2(tmp_path):
    path = str(tmp_path / "gt.png")
    if int(np.__version__.split(".")[0]) >= 2:
        broken = run_python(SEM_SEG_EVAL.format(prelude="", path=path))
        assert broken.returncode != 0 and "copy" in broken.stderr
    fixed = run_python(SEM_SEG_EVAL.format(prelude="import convmae_det", path=path))
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "mIoU 100.0" in fixed.stdout


DDP_ON_CPU = """
import torch
{prelude}
from detectron2.engine import launch
from detectron2.engine.defaults import create_ddp_model

def work():
    model = torch.nn.Linear(4, 2)
    ddp = create_ddp_model(model)
    loss = ddp(torch.ones(3, 4)).sum()
    loss.backward()
    import torch.distributed as dist
    g = model.weight.grad.clone()
    dist.all_reduce(g)
    assert torch.allclose(g / 2, model.weight.grad)
    if dist.get_rank() == 0:
        print("DDP-OK", type(ddp).__name__)

if __name__ == "__main__":
    launch(work, 2, dist_url="tcp://127.0.0.1:{port}")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_ddp_needs_device_ids_none(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_ON_CPU.format(prelude="", port=_free_port())))
    broken = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert broken.returncode != 0 and "device_ids" in broken.stderr
    script.write_text(
        textwrap.dedent(DDP_ON_CPU.format(prelude="import convmae_det", port=_free_port()))
    )
    fixed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "DDP-OK DistributedDataParallel" in fixed.stdout


def test_official_args_namespace_needs_the_allow_list(tmp_path):
    import argparse

    path = str(tmp_path / "official.pth")
    torch.save(
        {"model": {"pos_embed": torch.zeros(1)}, "args": argparse.Namespace(lr=1.5e-4)}, path
    )
    code = f"""
    import torch
    {{prelude}}
    try:
        print("LOADED", torch.load({path!r}, weights_only=True)["args"].lr)
    except Exception as e:
        print("REFUSED", type(e).__name__)
    """
    broken = run_python(code.format(prelude=""))
    assert "REFUSED" in broken.stdout
    fixed = run_python(code.format(prelude="import convmae_det"))
    assert "LOADED 0.00015" in fixed.stdout, fixed.stderr
