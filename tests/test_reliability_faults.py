"""Faults during training: a non-finite loss stops the run naming the iteration and the terms
(or skips the batch without touching the weights), bad samples are named or skipped and counted,
and --resume picks the newest complete checkpoint."""

from __future__ import annotations

import datetime
import logging
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from detectron2.engine import HookBase, hooks

from convmae_det.checkpoint import ConvMAECheckpointer
from convmae_det.data.resumable_loader import BadSampleError, ResumableTrainLoader
from convmae_det.engine import ConvMAETrainer
from convmae_det.engine.hooks import (
    AMPOverflowCounter,
    FiniteLossGuard,
    NonFiniteLossError,
    scaler_step,
)
from convmae_det.engine.resume import newest_checkpoint, repair_last_checkpoint


class _Model(nn.Module):
    """Two loss terms; ``loss_b`` becomes NaN for batches marked ``bad``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        a = (self.w**2).sum()
        b = self.w.sum() * (float("nan") if batch[0]["bad"] else 1.0)
        return {"loss_a": a, "loss_b": b}


def _trainer(bad_at, mode):
    model = _Model()
    data = [[{"bad": i == bad_at}] for i in range(10)]
    guard = FiniteLossGuard(mode=mode, last_checkpoint=lambda: "out/model_0000001.pth")
    trainer = ConvMAETrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1), guard=guard)
    return trainer, model


def test_nonfinite_loss_stops_naming_iteration_terms_and_last_good_checkpoint():
    trainer, model = _trainer(bad_at=2, mode="stop")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train(0, 5)
    message = str(info.value)
    assert "iteration 2" in message and "loss_b=nan" in message and "loss_a=" in message
    assert "out/model_0000001.pth" in message
    assert torch.isfinite(model.w).all()  # the bad gradients never reached the weights


def test_nonfinite_loss_in_skip_mode_leaves_weights_unchanged_and_counts(caplog):
    trainer, model = _trainer(bad_at=2, mode="skip")
    weights = {}

    class Record(HookBase):
        def after_step(self):
            weights[self.trainer.iter] = model.w.detach().clone()

    trainer.register_hooks([Record()])
    with caplog.at_level(logging.WARNING):
        trainer.train(0, 4)
    assert torch.equal(weights[2], weights[1]) and not torch.equal(weights[3], weights[2])
    assert torch.isfinite(model.w).all()
    assert "Non-finite loss at iteration 2" in caplog.text and "skipped (1/10)" in caplog.text
    assert trainer.storage.history("nonfinite_skipped").latest() == 1


@pytest.mark.parametrize("bad_at", [4, None])
def test_model_final_is_written_only_when_the_run_finished(tmp_path, bad_at):
    # the hook lazy_train uses; guards against a detectron2 whose after_train saves a failed run
    trainer, model = _trainer(bad_at=bad_at, mode="stop")
    checkpointer = ConvMAECheckpointer(model, save_dir=str(tmp_path))
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, period=2, max_to_keep=None)])
    if bad_at is None:
        trainer.train(0, 5)
        assert os.path.isfile(tmp_path / "model_final.pth")
    else:  # fails at its last iteration: nothing may look like a finished run
        with pytest.raises(NonFiniteLossError):
            trainer.train(0, 5)
        assert not os.path.exists(tmp_path / "model_final.pth")
        assert os.path.isfile(tmp_path / "model_0000003.pth")


def _two_process_worker(rank, init_file, mode, out_dir):
    """Rank 1 alone sees a NaN loss at iteration 2; DDP all-reduces the gradients."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        model = _Model()
        ddp = nn.parallel.DistributedDataParallel(model)
        data = [[{"bad": rank == 1 and i == 2}] for i in range(6)]
        trainer = ConvMAETrainer(
            ddp, data, torch.optim.SGD(ddp.parameters(), lr=0.1), guard=FiniteLossGuard(mode=mode)
        )
        weights = []
        trainer.register_hooks(
            [hooks.CallbackHook(after_step=lambda t: weights.append(model.w.detach().clone()))]
        )
        try:
            trainer.train(0, 4)
            outcome = "finished"
        except NonFiniteLossError as e:
            outcome = f"stopped at {e}"
        torch.save({"outcome": outcome, "weights": weights}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nan_on_one_process_is_seen_by_all_processes(tmp_path, mode):
    mp.spawn(
        _two_process_worker, args=(str(tmp_path / "init"), mode, str(tmp_path)), nprocs=2,
        join=True,
    )  # fmt: skip
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for r in results:
        assert all(torch.isfinite(w).all() for w in r["weights"])
    if mode == "stop":  # both stop at iteration 2 (none hangs, none steps with NaN gradients)
        assert all(
            r["outcome"].startswith("stopped at Non-finite loss at iteration 2") for r in results
        )
        assert all(len(r["weights"]) == 2 for r in results)
    else:  # both skip iteration 2 and finish with the same weights
        assert all(r["outcome"] == "finished" and len(r["weights"]) == 4 for r in results)
        for r in results:
            assert torch.equal(r["weights"][2], r["weights"][1])
        assert torch.equal(results[0]["weights"][-1], results[1]["weights"][-1])


def test_unknown_nonfinite_mode_is_refused():
    with pytest.raises(ValueError, match="train.nonfinite_loss='ignore'"):
        FiniteLossGuard(mode="ignore")
    with pytest.raises(ValueError, match="SOLVER.NONFINITE_LOSS='ignore'"):
        FiniteLossGuard(mode="ignore", config_key="SOLVER.NONFINITE_LOSS")


class _Linear(nn.Module):
    """loss = sum(w . x): in fp16 the weight gradient is scale * x, which overflows (> 65504)
    for x = 3 at the initial scales 2**16 and 2**15, and for x = 1e4 at any scale >= 8."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return {"loss": self.fc(x).sum()}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_amp_overflow_counter_counts_the_fp16_steps_the_scaler_skipped(device, caplog):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _Linear().to(device)
    data = [torch.full((1, 4), 1e4 if i == 5 else 3.0, device=device) for i in range(8)]
    trainer = ConvMAETrainer(model, data, torch.optim.SGD(model.parameters(), lr=1e-3),
                             precision=torch.float16, device_type=device)  # fmt: skip
    counter = AMPOverflowCounter()
    weights = {}

    class Record(HookBase):
        def after_step(self):
            weights[self.trainer.iter] = model.fc.weight.detach().clone()

    trainer.register_hooks([counter, Record()])
    before = model.fc.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="convmae_det.engine.hooks"):
        trainer.train(0, 8)
    assert counter.overflows == 3 and trainer.grad_scaler.get_scale() == 2.0**13
    assert trainer.storage.history("amp_overflow_steps").values()[-1][0] == 3
    for skipped, previous in ((0, before), (1, weights[0]), (5, weights[4])):
        assert torch.equal(weights[skipped], previous)  # the step was skipped
    for taken in (2, 3, 4, 6, 7):
        assert not torch.equal(weights[taken], weights[taken - 1])
    assert torch.isfinite(model.fc.weight).all()
    assert "fp16 overflow at iteration 5: step skipped by scaler" in caplog.text
    restored = AMPOverflowCounter()
    restored.load_state_dict(counter.state_dict())
    assert restored.overflows == 3


def test_amp_overflow_counter_is_silent_without_an_enabled_scaler():
    model = _Linear()
    data = [torch.full((1, 4), 3.0)] * 2
    trainer = ConvMAETrainer(model, data, torch.optim.SGD(model.parameters(), lr=1e-3))
    counter = AMPOverflowCounter()
    trainer.register_hooks([counter])
    trainer.train(0, 2)
    assert counter.overflows == 0 and "amp_overflow_steps" not in trainer.storage.histories()


class _Records:
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"file_name": f"images/{i}.jpg", "i": i}


def _mapper(record):
    if record["i"] == 3:
        raise OSError("image file is truncated")
    return record["i"]


def test_bad_sample_error_names_the_file():
    loader = ResumableTrainLoader(_Records(), mapper=_mapper, total_batch_size=5, seed=0)
    with pytest.raises(BadSampleError, match=r"images/3\.jpg.*truncated"):
        next(iter(loader))


def test_skip_bad_samples_logs_counts_and_replaces_reproducibly(caplog):
    def first_batch():
        loader = ResumableTrainLoader(
            _Records(), mapper=_mapper, total_batch_size=5, seed=0, skip_bad_samples=True
        )
        with caplog.at_level(logging.WARNING):
            batch = next(iter(loader))
        return batch, loader

    batch, loader = first_batch()
    assert len(batch) == 5 and 3 not in batch
    assert loader.num_skipped >= 1 and loader.state_dict()["num_skipped"] == loader.num_skipped
    assert "Skipped bad sample #1" in caplog.text and "images/3.jpg" in caplog.text
    assert first_batch()[0] == batch  # the replacement is drawn from the seed


def _touch(path, size=10):
    """A small real checkpoint (``size=0``: an empty file); resume skips unreadable ones."""
    if size:
        torch.save({"model": {}, "iteration": 0}, path)
    else:
        open(path, "wb").close()


def test_resume_picks_newest_complete_checkpoint_when_last_checkpoint_is_stale(tmp_path):
    out = str(tmp_path)
    for name in ("model_0000001.pth", "model_0000003.pth"):
        _touch(os.path.join(out, name))
    _touch(os.path.join(out, ".tmp-abc.pth"))  # an interrupted save: never a candidate
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")  # killed between the rename and this update:
    os.utime(os.path.join(out, "last_checkpoint"), (1e9, 1e9))  # older than model_0000003.pth
    checkpointer = ConvMAECheckpointer(nn.Linear(1, 1), out)
    assert newest_checkpoint(out) == "model_0000003.pth"
    assert repair_last_checkpoint(checkpointer) == "model_0000003.pth"
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000003.pth"


def test_last_checkpoint_edited_after_the_newest_checkpoint_is_a_roll_back_and_kept(tmp_path):
    out = str(tmp_path)
    for name in ("model_0000001.pth", "model_0000003.pth"):
        _touch(os.path.join(out, name))
        os.utime(os.path.join(out, name), (1e9, 1e9))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")  # written by hand after the run: restart from iteration 1
    checkpointer = ConvMAECheckpointer(nn.Linear(1, 1), out)
    assert repair_last_checkpoint(checkpointer) == "model_0000001.pth"
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000001.pth"


def test_resume_without_last_checkpoint_file_uses_newest_and_empty_folder_means_none(tmp_path):
    checkpointer = ConvMAECheckpointer(nn.Linear(1, 1), str(tmp_path))
    assert repair_last_checkpoint(checkpointer) == ""
    _touch(os.path.join(str(tmp_path), "model_0000004.pth"))
    _touch(os.path.join(str(tmp_path), "model_0000010.pth"), size=0)  # empty: not complete
    assert repair_last_checkpoint(checkpointer) == "model_0000004.pth"
    assert checkpointer.has_checkpoint()


def test_scaler_step_reports_the_fp16_steps_it_skipped():
    # the step the segmentation and pretraining loops take (they count the True results)
    model = _Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skipped = []
    for x in (3.0, 3.0, 3.0, 1e4, 3.0):
        before = model.fc.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.full((1, 4), x))["loss"]
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        skipped.append(scaler_step(scaler, optimizer))
        assert torch.equal(model.fc.weight, before) == skipped[-1]
    assert skipped == [True, True, False, True, False]
    assert not scaler_step(torch.amp.GradScaler("cpu", enabled=False), optimizer)
