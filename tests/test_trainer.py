"""The one trainer and its settings: fp32 steps equal detectron2's SimpleTrainer bit for bit, the
skip policy leaves weights and BatchNorm statistics untouched, gradient clipping, the lr hook,
one precision table, settings from either config kind, and old segmentation resume points."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn as nn
from detectron2.config import get_cfg
from detectron2.engine import HookBase, SimpleTrainer
from omegaconf import OmegaConf

from convmae_det.config import add_convmae_config
from convmae_det.engine import ConvMAETrainer, RunSettings
from convmae_det.engine.hooks import FiniteLossGuard, LRScheduler, NonFiniteLossError
from convmae_det.engine.training import upgrade_training_state
from convmae_det.utils.precision import PRECISIONS, parse_precision


class _BNModel(nn.Module):
    """Conv + BatchNorm + linear; the loss becomes NaN for batches marked ``bad``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1)

    def forward(self, batch):
        x, bad = batch
        y = self.fc(self.bn(self.conv(x)).mean((2, 3))).pow(2).mean()
        return {"loss_main": y * (float("nan") if bad else 1.0), "loss_aux": self.fc.bias.abs()[0]}


def _data(n: int, bad_at: int = -1):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 8, 8, generator=g), i == bad_at) for i in range(n)]


def _run(trainer_cls, optimizer_cls, steps: int = 6, **kwargs):
    torch.manual_seed(0)
    model = _BNModel()
    opt = optimizer_cls(model.parameters())
    trainer = trainer_cls(model, _data(steps), opt, **kwargs)
    trainer.train(0, steps)
    return model


@pytest.mark.parametrize(
    "optimizer_cls",
    [
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4),
        functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.05),
    ],
    ids=["sgd", "adamw"],
)
def test_fp32_steps_equal_detectron2_simple_trainer_bit_for_bit(optimizer_cls):
    ours = _run(ConvMAETrainer, optimizer_cls)
    reference = _run(SimpleTrainer, optimizer_cls)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_skip_policy_restores_batchnorm_statistics_and_weights():
    torch.manual_seed(0)
    model = _BNModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = ConvMAETrainer(model, _data(4, bad_at=2), opt, guard=FiniteLossGuard(mode="skip"))
    states = {}

    class Record(HookBase):
        def after_step(self):
            states[self.trainer.iter] = {k: v.clone() for k, v in model.state_dict().items()}

    trainer.register_hooks([Record()])
    trainer.train(0, 4)
    for key in states[1]:  # weights, running mean / var and batches tracked
        assert torch.equal(states[2][key], states[1][key]), key
    assert not torch.equal(states[3]["bn.running_mean"], states[2]["bn.running_mean"])
    assert int(states[3]["bn.num_batches_tracked"]) == 3
    assert trainer.storage.history("nonfinite_skipped").latest() == 1


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    before = model.weight.detach().clone()
    data = [torch.full((1, 4), 100.0)]
    trainer = ConvMAETrainer(
        _LossOf(model),
        data,
        torch.optim.SGD(model.parameters(), lr=1.0),
        grad_clip=functools.partial(nn.utils.clip_grad_norm_, max_norm=0.5),
    )
    trainer.train(0, 1)
    step = (model.weight.detach() - before).norm()
    assert step == pytest.approx(0.5, rel=1e-5)  # unclipped it would be 200


class _LossOf(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"loss": self.inner(x).sum()}


def test_lr_hook_logs_the_base_lr_of_layer_decay_groups():
    from detectron2.solver import LRMultiplier
    from fvcore.common.param_scheduler import LinearParamScheduler

    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    model = nn.ModuleDict({"a": a, "b": b})
    groups = [
        {"params": list(a.parameters()), "lr": 0.1 * 0.5, "lr_scale": 0.5},
        {"params": list(b.parameters()), "lr": 0.1, "lr_scale": 1.0},
    ]
    opt = torch.optim.SGD(groups, lr=0.1)
    sched = LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=4)
    data = [torch.ones(1, 2)] * 4
    trainer = ConvMAETrainer(_LossOf(nn.Sequential(a)), data, opt)
    trainer.register_hooks([LRScheduler(scheduler=sched)])
    trainer.train(0, 4)
    logged = [v for v, _ in trainer.storage.history("lr").values()]
    assert logged == pytest.approx([0.1, 0.075, 0.05, 0.025])


def test_trainer_state_has_the_scaler_only_when_it_is_used():
    model = _LossOf(nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fp16 = ConvMAETrainer(model, [], opt, precision=torch.float16, device_type="cpu")
    assert "grad_scaler" in fp16.state_dict()
    fp32 = ConvMAETrainer(model, [], opt)
    state = fp32.state_dict()
    assert "grad_scaler" not in state and set(state) == {"iteration", "optimizer"}
    fp16.load_state_dict(state)  # an fp32 resume point into an fp16 run: the scaler starts fresh
    fp32.load_state_dict(fp16.state_dict())


def test_old_segmentation_resume_points_are_upgraded_to_the_trainer_layout():
    old = {
        "model": {"w": torch.ones(1)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 7},
        "seeder": {"seed": 42},
        "data_loader": {"seed": 9},
        "scaler": {"scale": 1024.0},
        "iteration": 7,
    }
    new = upgrade_training_state(old)
    assert new["trainer"] == {
        "iteration": 7,
        "optimizer": {"state": {}, "param_groups": []},
        "hooks": {"LRScheduler": {"last_epoch": 7}, "IterationSeeder": {"seed": 42}},
        "grad_scaler": {"scale": 1024.0},
    }
    assert set(new) == {"model", "trainer", "data_loader", "iteration"}
    assert "optimizer" in old  # the input is not modified
    assert upgrade_training_state(new) is new  # already in the trainer layout
    weights_only = {"model": {"w": torch.ones(1)}}
    assert upgrade_training_state(weights_only) is weights_only


def test_one_precision_table_for_every_spelling():
    for name in ("bf16", "bfloat16"):
        assert parse_precision(name, key="k") is torch.bfloat16
    for name in ("fp16", "float16"):
        assert parse_precision(name, key="k") is torch.float16
    assert parse_precision("fp32", key="k") is torch.float32
    with pytest.raises(ValueError, match=r"SOLVER.AMP.DTYPE='fp32'; expected one of \['bf16'"):
        parse_precision("fp32", key="SOLVER.AMP.DTYPE", allow_fp32=False)
    with pytest.raises(ValueError, match="--dtype='half'"):
        parse_precision("half", key="--dtype")
    assert set(PRECISIONS.values()) == {torch.float32, torch.bfloat16, torch.float16}


def _seg_cfg(**solver):
    cfg = get_cfg()
    add_convmae_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    for key, value in solver.items():
        node, leaf = cfg.SOLVER, key
        if "." in key:
            head, leaf = key.split(".")
            node = getattr(cfg.SOLVER, head)
        setattr(node, leaf, value)
    return cfg


def test_settings_read_either_config_kind_in_one_place(caplog):
    cfg = _seg_cfg(
        MAX_ITER=30, CHECKPOINT_PERIOD=10, CHECKPOINT_MAX_TO_KEEP=0, NONFINITE_LOSS="skip",
        NONFINITE_MAX_SKIPS=3, LOG_PERIOD=0,
    )  # fmt: skip
    cfg.TEST.EVAL_PERIOD, cfg.SEED, cfg.OUTPUT_DIR = 15, 7, "out/seg"
    seg = RunSettings.from_yacs(cfg)
    assert (seg.device, seg.precision, seg.seed, seg.max_iter) == ("cpu", None, 7, 30)
    assert seg.checkpointer == {"period": 10, "max_to_keep": None}
    assert (seg.nonfinite_loss, seg.nonfinite_max_skips) == ("skip", 3)
    assert (seg.eval_period, seg.log_period, seg.output_dir) == (15, 1, "out/seg")
    assert seg.key("nonfinite_loss") == "SOLVER.NONFINITE_LOSS"
    train = OmegaConf.create(
        dict(max_iter=30, device="cpu", seed=7, checkpointer=dict(period=10, max_to_keep=None),
             eval_period=15, log_period=1, output_dir="out/seg", nonfinite_loss="skip",
             amp=dict(enabled=False, precision="bf16"))
    )  # fmt: skip
    det = RunSettings.from_lazy(train)
    assert det.key("nonfinite_loss") == "train.nonfinite_loss"
    same = ("device", "precision", "seed", "max_iter", "checkpointer", "eval_period", "log_period")
    assert all(getattr(det, k) == getattr(seg, k) for k in same + ("output_dir",))
    cfg = _seg_cfg()
    cfg.SEED = -1  # a random run seed is drawn once, here: the settings hold the resolved one
    assert 0 <= RunSettings.from_yacs(cfg).seed < 2**31
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE='fp8'"):
        RunSettings.from_yacs(_seg_cfg(**{"AMP.DTYPE": "fp8"}))
    with caplog.at_level(logging.WARNING):
        amp = RunSettings.from_yacs(_seg_cfg(**{"AMP.ENABLED": True}))
    assert amp.precision is None and "SOLVER.AMP.ENABLED=True ignored" in caplog.text
    if not torch.cuda.is_available():
        cfg = _seg_cfg()
        cfg.MODEL.DEVICE = "cuda"
        with caplog.at_level(logging.WARNING):
            assert RunSettings.from_yacs(cfg).device == "cpu"
        assert "MODEL.DEVICE='cuda' but CUDA is not available" in caplog.text


def test_one_nonfinite_policy_counts_in_all_or_in_a_row():
    nan, ok = {"loss": float("nan")}, {"loss": 1.0}
    total = FiniteLossGuard(mode="skip", max_skips=2)  # detection / segmentation
    assert total.check(nan, 0) and not total.check(ok, 1) and total.check(nan, 2)
    assert not total.check(ok, 3)
    with pytest.raises(NonFiniteLossError, match="at iteration 4 after 2 skipped batches"):
        total.check(nan, 4)  # a third in all, though not in a row
    in_a_row = FiniteLossGuard(  # pretraining, as the official loop
        mode="skip", max_skips=None, max_consecutive=3, advice="or use bf16"
    )
    for it in range(10):  # any number of isolated non-finite losses
        assert in_a_row.check(nan if it % 2 else ok, it) == bool(it % 2)
    assert in_a_row.skipped == 5 and in_a_row.consecutive == 1
    assert in_a_row.check(nan, 10) and in_a_row.consecutive == 2
    with pytest.raises(NonFiniteLossError) as info:
        in_a_row.check(nan, 11)
    message = str(info.value)
    assert message.startswith("3 consecutive non-finite losses, the last at iteration 11")
    assert message.endswith("lower the learning rate; or use bf16.")
    stop = FiniteLossGuard(mode="stop", config_key="SOLVER.NONFINITE_LOSS")
    with pytest.raises(NonFiniteLossError, match="set SOLVER.NONFINITE_LOSS=skip"):
        stop.check({"loss_a": 1.0, "loss_b": float("inf")}, 4)


def test_pretraining_reads_the_same_settings_with_the_official_nonfinite_rule():
    from convmae_det.engine import build_trainer
    from convmae_det.engine.pretrain_loop import PRETRAIN_DEFAULTS

    train = dict(PRETRAIN_DEFAULTS, max_nonfinite=3, amp_dtype="bf16", log_period=5)
    settings = RunSettings.from_pretrain(train, device="cpu", max_iter=40, seed=3)
    assert settings.precision is None  # AMP is for CUDA; bf16 is a valid spelling
    assert (settings.max_iter, settings.log_period, settings.eval_period) == (40, 5, 0)
    assert settings.seed == 3
    assert (settings.nonfinite_loss, settings.nonfinite_max_skips) == ("skip", None)
    assert settings.nonfinite_max_in_a_row == 3
    model = _LossOf(nn.Linear(2, 1))
    trainer = build_trainer(
        model, [], torch.optim.SGD(model.parameters(), lr=0.1), settings, accumulation=2
    )
    assert trainer.accumulation == 2 and trainer.guard.max_consecutive == 3
    with pytest.raises(ValueError, match="train.amp_dtype='half'"):
        RunSettings.from_pretrain(dict(train, amp_dtype="half"), device="cpu", max_iter=1, seed=0)
