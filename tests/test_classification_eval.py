"""ClassificationEvaluator: top-k / loss on hand-made logits, k above the class count,
duplicates, a short split, the predictions file, and a real two-process (gloo) evaluation
through detectron2's ``inference_on_dataset`` and ``InferenceSampler``."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List

import pytest
import torch
import torch.nn as nn
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset

from convmae_det.evaluation import ClassificationEvaluator
from convmae_det.evaluation.classification import PREDICTIONS_FILE

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# Class probabilities of four images over six classes; the logits are log(p) + a shift, so the
# cross-entropy against the label is -log(p[label]) whatever the shift.
PROBS = [
    [0.50, 0.20, 0.11, 0.09, 0.06, 0.04],  # label 0: rank 1
    [0.40, 0.30, 0.10, 0.11, 0.05, 0.04],  # label 1: rank 2
    [0.02, 0.08, 0.15, 0.20, 0.25, 0.30],  # label 0: rank 6
    [0.05, 0.15, 0.10, 0.22, 0.30, 0.18],  # label 4: rank 1
]
LABELS = [0, 1, 0, 4]


def _logits(probs: List[float], shift: float = 7.0) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float() + shift


def _inputs(ids, labels) -> List[Dict[str, Any]]:
    return [{"image_id": i, "label": y, "file_name": f"img_{i}.jpg"} for i, y in zip(ids, labels)]


def _outputs(logits) -> List[Dict[str, torch.Tensor]]:
    return [{"logits": x, "scores": x.softmax(-1), "pred_class": x.argmax()} for x in logits]


@pytest.fixture
def warnings_seen():
    """Warnings of the evaluator's logger, whatever its propagation is set to."""
    records: List[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("convmae_det.evaluation.classification")
    handler = _Keep(level=logging.WARNING)
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


@pytest.fixture
def registered():
    """Register a list of dicts as a dataset for one test."""
    names: List[str] = []

    def register(name: str, dicts: List[Dict[str, Any]]) -> str:
        DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)


def _evaluate(evaluator: ClassificationEvaluator, batches) -> Dict[str, Any]:
    evaluator.reset()
    for inputs, outputs in batches:
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_top1_top3_top5_and_loss_match_the_hand_computed_values(warnings_seen):
    logits = [_logits(p) for p in PROBS]
    evaluator = ClassificationEvaluator(topk=(1, 3, 5))
    # two batches of two images (the evaluator sees batches, not single images)
    batches = [
        (_inputs([0, 1], LABELS[:2]), _outputs(logits[:2])),
        (_inputs([2, 3], LABELS[2:]), _outputs(logits[2:])),
    ]
    result = _evaluate(evaluator, batches)
    assert set(result) == {"classification"}
    metrics = result["classification"]
    assert set(metrics) == {"top1", "top3", "top5", "loss", "num_images"}
    # top-1: images 0 and 3 -> 2/4; top-3 and top-5: all but image 2 (label ranked 6th) -> 3/4
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["top3"] == pytest.approx(75.0)
    assert metrics["top5"] == pytest.approx(75.0)
    expected_loss = -(math.log(0.5) + math.log(0.3) + math.log(0.02) + math.log(0.3)) / 4
    assert expected_loss == pytest.approx(
        1.7533, abs=1e-4
    )  # (0.6931 + 1.2040 + 3.9120 + 1.2040) / 4
    assert metrics["loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert metrics["num_images"] == 4
    assert not warnings_seen

    # the same numbers as torch's own cross-entropy over the batch
    torch_loss = nn.functional.cross_entropy(torch.stack(logits), torch.tensor(LABELS)).item()
    assert metrics["loss"] == pytest.approx(torch_loss, abs=1e-6)

    # reset starts a new round
    evaluator.reset()
    evaluator.process(_inputs([0], [1]), _outputs(logits[:1]))
    again = evaluator.evaluate()["classification"]
    assert (again["top1"], again["top3"], again["num_images"]) == (0.0, 100.0, 1)
    assert again["loss"] == pytest.approx(-math.log(0.2), abs=1e-5)


def test_half_precision_logits_are_scored_in_float32():
    logits = [_logits(p).half() for p in PROBS]
    metrics = _evaluate(ClassificationEvaluator(), [(_inputs(range(4), LABELS), _outputs(logits))])[
        "classification"
    ]
    expected = nn.functional.cross_entropy(torch.stack(logits).float(), torch.tensor(LABELS)).item()
    assert metrics["loss"] == pytest.approx(expected, abs=1e-6)
    assert (metrics["top1"], metrics["top5"]) == (50.0, 75.0)


def test_k_above_the_class_count_counts_as_all_classes():
    logits = [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 2.0])]
    evaluator = ClassificationEvaluator(topk=(1, 2, 5, 10))
    metrics = _evaluate(evaluator, [(_inputs([7, 8], [1, 0]), _outputs(logits))])["classification"]
    # image 7: label 1 ranked 2nd; image 8: label 0 ranked 3rd (last)
    assert metrics["top1"] == 0.0
    assert metrics["top2"] == 50.0
    assert metrics["top5"] == 100.0 and metrics["top10"] == 100.0
    assert metrics["num_images"] == 2


def test_duplicates_are_counted_once_with_a_warning(warnings_seen):
    logits = [_logits(p) for p in PROBS]
    evaluator = ClassificationEvaluator()
    batches = [
        (_inputs([0, 1, 2, 3], LABELS), _outputs(logits)),
        # images 2 and 3 again, as a sampler that pads its shards would repeat them
        (_inputs([2, 3], LABELS[2:]), _outputs(logits[2:])),
    ]
    metrics = _evaluate(evaluator, batches)["classification"]
    assert metrics["num_images"] == 4
    assert (metrics["top1"], metrics["top5"]) == (50.0, 75.0)
    messages = [r.getMessage() for r in warnings_seen]
    assert len(messages) == 1 and "2 duplicate" in messages[0], messages


def test_fewer_images_than_the_dataset_warns_with_the_missing_count(warnings_seen, registered):
    name = registered("cls_eval_test_short", _inputs(range(10, 15), [0, 1, 0, 1, 0]))
    logits = [torch.tensor([1.0, 0.0])] * 3
    evaluator = ClassificationEvaluator(name)
    metrics = _evaluate(evaluator, [(_inputs([10, 11, 12], [0, 1, 0]), _outputs(logits))])
    assert metrics["classification"]["num_images"] == 3
    assert metrics["classification"]["top1"] == pytest.approx(200.0 / 3)
    messages = [r.getMessage() for r in warnings_seen]
    assert len(messages) == 1, messages
    assert "2 of the dataset's 5 images were not evaluated" in messages[0]
    assert "[13, 14]" in messages[0]

    # the whole split: no warning
    warnings_seen.clear()
    _evaluate(evaluator, [(_inputs(range(10, 15), [0] * 5), _outputs([logits[0]] * 5))])
    assert not warnings_seen


def test_unregistered_dataset_name_skips_the_count_check(warnings_seen):
    evaluator = ClassificationEvaluator("cls_eval_test_not_registered")
    result = _evaluate(evaluator, [(_inputs([0], [0]), _outputs([torch.tensor([1.0, 0.0])]))])
    assert result["classification"]["num_images"] == 1
    assert not warnings_seen


def test_no_images_warns_and_returns_an_empty_dict(warnings_seen):
    assert _evaluate(ClassificationEvaluator("anything"), []) == {}
    assert len(warnings_seen) == 1 and "no predictions" in warnings_seen[0].getMessage()


def test_predictions_file_is_written_atomically_sorted_by_image_id(tmp_path):
    logits = [_logits(p) for p in PROBS]
    out = tmp_path / "inference"
    evaluator = ClassificationEvaluator(output_dir=str(out))
    batches = [
        (_inputs([3, 1], [LABELS[3], LABELS[1]]), _outputs([logits[3], logits[1]])),
        (_inputs([2, 0], [LABELS[2], LABELS[0]]), _outputs([logits[2], logits[0]])),
    ]
    _evaluate(evaluator, batches)
    assert sorted(os.listdir(out)) == [PREDICTIONS_FILE]  # no temporary file left behind
    rows = json.loads((out / PREDICTIONS_FILE).read_text())
    assert [r["image_id"] for r in rows] == [0, 1, 2, 3]
    assert [r["label"] for r in rows] == LABELS
    assert [r["file_name"] for r in rows] == [f"img_{i}.jpg" for i in range(4)]
    assert rows[0]["topk"] == [0, 1, 2, 3, 4]
    assert rows[1]["topk"] == [0, 1, 3, 2, 4]
    assert rows[2]["topk"] == [5, 4, 3, 2, 1]
    assert rows[3]["topk"] == [4, 3, 5, 1, 2]
    assert rows[2]["loss"] == pytest.approx(-math.log(0.02), abs=1e-5)


def test_bad_inputs_are_named():
    evaluator = ClassificationEvaluator()
    with pytest.raises(ValueError, match=r"labels outside \[0, 2\)"):
        evaluator.process(_inputs([5], [2]), _outputs([torch.zeros(2)]))
    with pytest.raises(KeyError, match="label"):
        evaluator.process([{"image_id": 1}], _outputs([torch.zeros(2)]))
    with pytest.raises(ValueError, match="positive integer"):
        ClassificationEvaluator(topk=(0, 5))


# --------------------------------------------------------------------------- two processes
NUM_CLASSES = 7
TOY_SPLIT = "cls_eval_toy_11"


class FakeClassifier(nn.Module):
    """Deterministic logits per image_id (the same whichever process or batch sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, batched_inputs):
        outputs = []
        for d in batched_inputs:
            gen = torch.Generator().manual_seed(1000 + int(d["image_id"]))
            logits = 3.0 * torch.randn(NUM_CLASSES, generator=gen) + self.dummy
            scores = logits.softmax(-1)
            outputs.append({"logits": logits, "scores": scores, "pred_class": scores.argmax()})
        return outputs


def toy_split(n: int = 11) -> List[Dict[str, Any]]:
    """An odd number of images, so that two processes get shards of different lengths."""
    return [
        {"image_id": 100 + i, "label": (3 * i) % NUM_CLASSES, "file_name": f"toy_{i}.jpg"}
        for i in range(n)
    ]


def run_toy_evaluation(output_dir: str) -> Dict[str, Any]:
    """``inference_on_dataset`` over the toy split in this process's process group; returns the
    result, the warnings logged and how many images this process saw."""
    if TOY_SPLIT not in DatasetCatalog.list():
        DatasetCatalog.register(TOY_SPLIT, toy_split)
    warnings: List[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    log = logging.getLogger("convmae_det.evaluation.classification")
    handler = _Keep(level=logging.WARNING)
    log.addHandler(handler)
    try:
        loader = build_detection_test_loader(toy_split(), mapper=lambda d: d, batch_size=2)
        evaluator = ClassificationEvaluator(TOY_SPLIT, output_dir=output_dir)
        result = inference_on_dataset(FakeClassifier(), loader, evaluator)
    finally:
        log.removeHandler(handler)
    return {"result": result, "warnings": warnings, "seen": len(loader.sampler)}


TWO_PROCESSES = """
import json, os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import convmae_det  # noqa: F401
from detectron2.engine import launch


def work(out):
    from detectron2.utils import comm
    from test_classification_eval import run_toy_evaluation

    record = run_toy_evaluation(os.path.join(out, "predictions"))
    record["world"] = comm.get_world_size()
    with open(os.path.join(out, f"rank{{comm.get_rank()}}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    launch(work, 2, dist_url="auto", args=({out!r},))
"""


def test_two_processes_count_every_image_once_and_equal_one_process(tmp_path, registered):
    # one process
    registered(TOY_SPLIT, toy_split())
    single = run_toy_evaluation(str(tmp_path / "single"))
    assert single["warnings"] == []
    metrics = single["result"]["classification"]
    assert metrics["num_images"] == 11 and single["seen"] == 11
    # the fake model's numbers, recomputed here without the evaluator
    model = FakeClassifier()
    logits = torch.stack([o["logits"] for o in model(toy_split())]).detach()
    labels = torch.tensor([d["label"] for d in toy_split()])
    assert metrics["loss"] == pytest.approx(
        nn.functional.cross_entropy(logits, labels).item(), abs=1e-5
    )
    top5 = logits.topk(5, dim=-1).indices
    assert metrics["top1"] == pytest.approx(100.0 * (top5[:, 0] == labels).float().mean().item())
    assert metrics["top5"] == pytest.approx(
        100.0 * (top5 == labels[:, None]).any(-1).float().mean().item()
    )

    # two CPU processes (gloo)
    out = tmp_path / "two"
    out.mkdir()
    script = tmp_path / "two_processes.py"
    script.write_text(textwrap.dedent(TWO_PROCESSES.format(root=ROOT, tests=TESTS, out=str(out))))
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    main = json.loads((out / "rank0.json").read_text())
    other = json.loads((out / "rank1.json").read_text())
    assert main["world"] == other["world"] == 2
    assert sorted([main["seen"], other["seen"]]) == [5, 6]  # uneven shards, no padding
    assert other["result"] == {}
    assert main["warnings"] == [] and other["warnings"] == []
    assert main["result"]["classification"]["num_images"] == 11
    assert main["result"] == single["result"]
    # the predictions file: every image once, identical to the one-process file
    assert sorted(os.listdir(out / "predictions")) == [PREDICTIONS_FILE]
    multi_rows = json.loads((out / "predictions" / PREDICTIONS_FILE).read_text())
    single_rows = json.loads((tmp_path / "single" / PREDICTIONS_FILE).read_text())
    assert [r["image_id"] for r in multi_rows] == [100 + i for i in range(11)]
    assert multi_rows == single_rows
    print(f"two-process evaluation: {time.time() - start:.1f}s")
