"""tools/lazyconfig_train_net.py end to end on the toy data (train, evaluate, resume, eval-only,
2-process gloo), checked overrides and datasets, optimizer groups and the AMP switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyCall, instantiate
from detectron2.data import DatasetCatalog
from detectron2.engine import SimpleTrainer
from omegaconf import OmegaConf

import convmae_det.data  # noqa: F401
from convmae_det.checkpoint import CheckpointError
from convmae_det.data.datasets.toy_coco import register_toy_coco
from convmae_det.engine import (
    ConvMAETrainer,
    OverrideTypeError,
    RunSettings,
    build_trainer,
    check_datasets,
    check_override_types,
    dataset_names_in_config,
    lazy_eval_only,
    load_lazy_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools/lazyconfig_train_net.py")
PAPER_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
VITDET_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convmae_vitdet_toy.py")
FAST = [
    "dataloader.train.dataset.names=toy_coco_mini",
    "dataloader.test.dataset.names=toy_coco_mini",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "train.log_period=1",
    "train.max_iter=2",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2data"))
    register_toy_coco(["toy_coco_mini"], root=os.path.join(root, "toy_coco"))
    DatasetCatalog.get("toy_coco_mini")  # generate once for every test of this module
    yield root
    register_toy_coco(["toy_coco_mini"])


def run_tool(args, data_root, timeout=600):
    env = {**os.environ, "DETECTRON2_DATASETS": data_root, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run(
        [sys.executable, TOOL] + list(args), capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=timeout,
    )  # fmt: skip
    return proc


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_iterations_train_evaluate_resume_and_eval_only(tmp_path, data_root):
    out = str(tmp_path / "run")
    proc = run_tool(["--config-file", PAPER_TOY, f"train.output_dir={out}"] + FAST, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model_final.pth", "last_checkpoint", "config.yaml", "config_source.py",
                 "log.txt", "final_metrics.json"):  # fmt: skip
        assert os.path.isfile(os.path.join(out, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [0, 1]
    results = json.load(open(os.path.join(out, "final_metrics.json")))
    assert {"bbox", "segm"} <= set(results) and "AP" in results["bbox"]
    log = open(os.path.join(out, "log.txt")).read()
    assert "eta:" in log and "No init checkpoint" in log

    proc = run_tool(
        ["--config-file", PAPER_TOY, "--resume", f"train.output_dir={out}"] + FAST
        + ["train.max_iter=3"], data_root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at iteration 2" in open(os.path.join(out, "log.txt")).read()
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [0, 1, 2]

    proc = run_tool(
        ["--config-file", PAPER_TOY, "--eval-only", f"train.output_dir={out}/eval",
         f"train.init_checkpoint={out}/model_final.pth"] + FAST, data_root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.load(open(os.path.join(out, "eval", "final_metrics.json")))
    assert set(again) == {"bbox", "segm"}
    log = open(os.path.join(out, "eval", "log.txt")).read()
    assert "Checkpoint report" in log and "missing: 0" in log and "unexpected: 0" in log


def test_a_fixed_run_seed_fixes_the_batches_of_a_random_loader_seed(tmp_path, data_root):
    """train.seed >= 0 with dataloader.train.seed=-1 (the shipped toy / COCO loaders): the loader
    seed derives from the run seed, so two runs train on the same batches to the same weights."""
    from convmae_det.engine import lazy_train
    from convmae_det.engine.settings import data_seed

    runs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        opts = FAST + [f"train.output_dir={out}", "train.seed=0", "dataloader.train.seed=-1"]
        lazy_train(load_lazy_config(PAPER_TOY, opts))
        runs.append(torch.load(os.path.join(out, "model_final.pth"), weights_only=False))
        losses = [m["total_loss"] for m in read_metrics(out) if "total_loss" in m]
        runs[-1]["losses"] = losses
    a, b = runs
    assert a["data_loader"]["seed"] == b["data_loader"]["seed"] == data_seed(0)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("starter", ["launch", "torchrun"])
def test_two_process_gloo_training_on_cpu(tmp_path, data_root, starter):
    out = str(tmp_path / "ddp")
    args = ["--config-file", VITDET_TOY, f"train.output_dir={out}"] + FAST
    if starter == "launch":  # detectron2's launch: --num-gpus 2 starts 2 CPU processes
        proc = run_tool(["--num-gpus", "2", "--dist-url", "auto"] + args, data_root)
    else:  # torchrun starts the processes, the tool joins their group
        env = {**os.environ, "DETECTRON2_DATASETS": data_root, "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = ROOT
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        proc = subprocess.run(
            command + ["--nproc-per-node", "2", TOOL] + args, capture_output=True, text=True,
            cwd=ROOT, env=env, timeout=600,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "World size: 2" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert {"bbox", "segm"} <= set(json.load(open(os.path.join(out, "final_metrics.json"))))


def test_unknown_override_key_is_refused_with_its_name():
    with pytest.raises(KeyError, match="'train.max_iters'"):
        load_lazy_config(PAPER_TOY, ["train.max_iters=3"])
    with pytest.raises(KeyError, match="model.backbone.bottom_up.windw_size"):
        load_lazy_config(PAPER_TOY, ["model.backbone.bottom_up.windw_size=8"])


def test_overrides_may_set_constructor_arguments_and_explicit_new_keys():
    cfg = load_lazy_config(
        PAPER_TOY, ["model.backbone.bottom_up.use_act_checkpoint=True", "+train.note=hello",
                    "train.max_iter=7"],
    )  # fmt: skip
    assert cfg.model.backbone.bottom_up.use_act_checkpoint is True
    assert cfg.train.note == "hello" and cfg.train.max_iter == 7


WRONG_TYPE_OVERRIDES = [
    ("train.max_iter=abc", "train.max_iter", "expects int (now 1500), got str 'abc'"),
    ("optimizer.lr=fast", "optimizer.lr", "expects float (now 0.002), got str 'fast'"),
    ("train.amp.enabled=maybe", "train.amp.enabled", "expects bool (now False), got str"),
    ("train.amp.enabled=1", "train.amp.enabled", "expects bool (now False), got int 1"),
    ("dataloader.train.total_batch_size=2.5", "dataloader.train.total_batch_size",
     "expects int (now 4), got float 2.5"),
    ("train.max_iter=null", "train.max_iter", "expects int (now 1500), got NoneType None"),
    ("train.init_checkpoint=123", "train.init_checkpoint",
     "expects str (now ''), got int 123 (write train.init_checkpoint='123' for a string)"),
    ("model.pixel_mean=3", "model.pixel_mean", "expects list (now [123.675, "),
    ("train.checkpointer=5", "train.checkpointer", "expects dict (now {'period': "),
]  # fmt: skip


@pytest.mark.parametrize(
    "override, key, expected", WRONG_TYPE_OVERRIDES, ids=[o for o, _, _ in WRONG_TYPE_OVERRIDES]
)
def test_override_of_the_wrong_type_is_refused_naming_key_value_and_type(override, key, expected):
    with pytest.raises(OverrideTypeError) as info:
        load_lazy_config(PAPER_TOY, ["train.max_iter=5", override])
    message = str(info.value)
    assert f"wrong type in override '{override}'" in message and f"'{key}' {expected}" in message
    assert "\n" not in message and isinstance(info.value, ValueError)


def test_overrides_of_compatible_types_interpolations_and_additions_are_accepted():
    cfg = load_lazy_config(
        PAPER_TOY, ["optimizer.lr=1", "optimizer.weight_decay=0", "train.init_checkpoint=null",
                    "train.init_checkpoint='123'", "dataloader.train.dataset.names=[a,b]",
                    "train.eval_period=${train.max_iter}", "model.pixel_mean=[1,2,3]",
                    "dataloader.train._target_=detectron2.data.build_detection_train_loader",
                    "+train.note=5", "train.amp.enabled=true"],
    )  # fmt: skip
    assert cfg.optimizer.lr == 1 and cfg.train.init_checkpoint == "123"
    assert list(cfg.dataloader.train.dataset.names) == ["a", "b"]
    assert cfg.train.eval_period == cfg.train.max_iter and cfg.train.amp.enabled is True


def _with_ratio(*, ratio: float = 4.0, depth: int = 2, path=None):
    return ratio, depth, path


def test_int_valued_key_takes_a_float_only_when_its_target_declares_a_float():
    cfg = OmegaConf.create({"net": LazyCall(_with_ratio)(ratio=4, depth=2), "free": None})
    check_override_types(cfg, ["net.ratio=2.5", "free=abc", "free=[1]", "net.path=3"])
    with pytest.raises(OverrideTypeError, match=r"'net.depth' expects int \(now 2\), got float"):
        check_override_types(cfg, ["net.depth=2.5"])


def test_unparsable_override_is_a_one_line_error_naming_it():
    with pytest.raises(ValueError, match=r"cannot parse override 'train.max_iter=\(1'"):
        load_lazy_config(PAPER_TOY, ["train.max_iter=(1"])


def test_missing_or_unregistered_dataset_is_named(tmp_path, monkeypatch):
    cfg = load_lazy_config(PAPER_TOY, ["dataloader.train.dataset.names=shapes_that_do_not_exist"])
    with pytest.raises(KeyError, match="shapes_that_do_not_exist.*dataloader.train.dataset.names"):
        check_datasets(dataset_names_in_config(cfg))
    monkeypatch.chdir(tmp_path)  # builtin COCO paths are relative to the working directory
    cfg = load_lazy_config(PAPER_TOY, FAST[:1] + ["dataloader.test.dataset.names=coco_2017_val"])
    with pytest.raises(FileNotFoundError, match="coco_2017_val.*instances_val2017.json"):
        check_datasets(dataset_names_in_config(cfg))


def test_strict_init_from_the_wrong_variant_fails_with_the_report(tmp_path, data_root):
    vitdet = instantiate(load_lazy_config(VITDET_TOY).model)
    path = str(tmp_path / "vitdet_style.pth")
    torch.save({"model": vitdet.state_dict()}, path)
    cfg = load_lazy_config(PAPER_TOY, FAST + [f"train.init_checkpoint={path}"])
    with pytest.raises(CheckpointError, match="strict loading failed"):
        lazy_eval_only(cfg, strict=True)


def _group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_optimizer_groups_layer_decay_and_no_weight_decay():
    cfg = load_lazy_config(VITDET_TOY)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    lr, wd = cfg.optimizer.lr, cfg.optimizer.weight_decay
    net = model.backbone.net
    # toy: 3 stage-3 blocks, decay 0.9 -> scale 0.9 ** (4 - layer_id)
    assert _group_of(opt, net.patch_embed1.proj.weight)["lr"] == pytest.approx(lr * 0.9**4)
    assert _group_of(opt, net.blocks2[0].conv1.weight)["lr"] == pytest.approx(lr * 0.9**4)
    assert _group_of(opt, net.blocks3[0].attn.qkv.weight)["lr"] == pytest.approx(lr * 0.9**3)
    assert _group_of(opt, net.blocks3[2].mlp.fc1.weight)["lr"] == pytest.approx(lr * 0.9)
    head = model.roi_heads.box_predictor.cls_score.weight
    assert _group_of(opt, head)["lr"] == pytest.approx(lr)
    assert _group_of(opt, head)["weight_decay"] == wd
    no_decay = [net.pos_embed, net.blocks3[1].attn.rel_pos_h, net.blocks3[0].norm1.weight,
                net.blocks1[0].norm2.bias, model.backbone.simfp_2[1].weight,  # detectron2 LN
                model.backbone.simfp_3[1].norm.weight]  # fmt: skip
    for p in no_decay:
        assert _group_of(opt, p)["weight_decay"] == 0.0


def test_paper_recipe_freezes_pos_embed_and_shares_one_group_per_table():
    cfg = load_lazy_config(PAPER_TOY, ["model.backbone.bottom_up.pos_embed_trainable=False"])
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is model.backbone.bottom_up.pos_embed for p in params)
    table = model.backbone.bottom_up.windowed_rel_pos_bias.relative_position_bias_table
    assert sum(p is table for p in params) == 1
    assert _group_of(opt, table)["weight_decay"] == 0.0


def _train_settings(**overrides) -> RunSettings:
    train = dict(max_iter=2, device="cpu", amp=dict(enabled=True, precision="bf16"))
    train.update(overrides)
    return RunSettings.from_lazy(OmegaConf.create(train))


def test_amp_is_turned_off_on_cpu(caplog):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("WARNING"):
        settings = _train_settings()
    assert settings.precision is None and settings.precision_name == "fp32"
    assert "train.amp.enabled=True ignored" in caplog.text
    trainer = build_trainer(model, [], opt, settings)
    assert isinstance(trainer, SimpleTrainer) and trainer.precision is None
    assert not trainer.grad_scaler.is_enabled() and "grad_scaler" not in trainer.state_dict()
    with pytest.raises(ValueError, match="train.amp.precision='fp8'"):
        _train_settings(amp=dict(enabled=True, precision="fp8"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_training_steps_on_cuda(precision, data_root):
    cfg = load_lazy_config(VITDET_TOY, FAST)
    model = instantiate(cfg.model).cuda()
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    settings = _train_settings(device="cuda", amp=dict(enabled=True, precision=precision))
    trainer = build_trainer(model, loader, opt, settings)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert isinstance(trainer, ConvMAETrainer) and trainer.precision == want
    trainer.train(0, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tool_reports_a_bad_override_and_a_missing_dataset_without_a_traceback(data_root):
    proc = run_tool(["--config-file", PAPER_TOY, "train.max_iters=3"], data_root)
    assert proc.returncode == 2
    assert "error: unknown config key 'train.max_iters'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_tool(["--config-file", PAPER_TOY, "dataloader.test.dataset.names=no_such_set"],
                    data_root)  # fmt: skip
    assert proc.returncode == 2 and "dataset 'no_such_set'" in proc.stderr


def test_tool_refuses_an_override_of_the_wrong_type_before_anything_runs(tmp_path):
    out = str(tmp_path / "never")
    proc = run_tool(["--config-file", PAPER_TOY, f"train.output_dir={out}", "train.max_iter=abc"],
                    str(tmp_path))  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'train.max_iter' expects int (now 1500), got str 'abc'" in proc.stderr
    assert not os.path.exists(out) and os.listdir(str(tmp_path)) == []  # no data generated


def test_detection_demo_function_returns_metrics_and_drawings(tmp_path, data_root):
    from convmae_det.visualization.demo_detection import run_detection_demo

    out = str(tmp_path / "demo")
    metrics = run_detection_demo(
        out, overrides=FAST + ["dataloader.test.dataset.names=toy_coco_mini"], num_processes=1,
        num_visualizations=1,
    )  # fmt: skip
    assert metrics["iterations"] == 2 and metrics["num_processes"] == 1
    assert 0.0 <= metrics["box_AP"] <= 100.0 and 0.0 <= metrics["mask_AP"] <= 100.0
    assert metrics["train_seconds"] > 0 and metrics["eval_seconds"] > 0
    assert len(metrics["visualizations"]) == 1 and os.path.isfile(metrics["visualizations"][0])
    assert json.load(open(os.path.join(out, "demo_metrics.json")))["box_AP"] == metrics["box_AP"]


def test_cpu_processes_share_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    from convmae_det.engine import launcher

    before = torch.get_num_threads()
    monkeypatch.setattr(launcher, "_available_cores", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert launcher.share_cpu_threads(2) == 4 and torch.get_num_threads() == 4
        assert launcher.share_cpu_threads(16) == 1 and torch.get_num_threads() == 1
        assert launcher.share_cpu_threads(1) is None  # one process keeps torch's default
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert launcher.share_cpu_threads(2) is None  # the user decided
    finally:
        torch.set_num_threads(before)
