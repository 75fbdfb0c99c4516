"""The COCO evaluation backend: faster-coco-eval gives pycocotools' numbers, and is the default."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.evaluation import coco_evaluation
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import convmae_det  # noqa: F401  (applies use_fast_cocoeval)
from convmae_det.benchmark.coco_eval import (
    coco_evaluator_stats,
    synthetic_coco_evaluation,
)
from convmae_det.evaluation import coco_backend
from convmae_det.evaluation.coco_backend import (
    cocoeval_backend,
    evaluate_predictions_on_coco,
    make_cocoeval,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("faster_coco_eval")


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_coco_evaluation(120, seed=3)


def _results_json(data):
    """The detections as COCO results (what COCOEvaluator.process stores), contiguous ids mapped."""
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    ids = sorted(c["id"] for c in data.gt["categories"])
    results = []
    for inp, out in zip(data.inputs, data.outputs):
        for r in instances_to_coco_json(out["instances"], inp["image_id"]):
            r["category_id"] = ids[r["category_id"]]
            results.append(r)
    return results


def test_synthetic_evaluation_covers_crowds_empty_images_and_every_area_range(synthetic):
    anns = synthetic.gt["annotations"]
    assert any(a["iscrowd"] for a in anns) and not all(a["iscrowd"] for a in anns)
    with_gt = {a["image_id"] for a in anns}
    assert len(with_gt) < len(synthetic.gt["images"])  # images without ground truth
    assert any(len(o["instances"]) == 0 for o in synthetic.outputs)  # images without detections
    assert max(len(o["instances"]) for o in synthetic.outputs) == 100
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any()
    assert (areas > 96**2).any()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_gives_the_12_stats_and_precisions_of_pycocotools(synthetic, iou_type):
    gt = COCO()
    gt.dataset = json.loads(json.dumps(synthetic.gt))
    gt.createIndex()
    results = _results_json(synthetic)
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    dt = gt.loadRes(results)
    evals = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        os.environ["CONVMAE_COCOEVAL"] = backend
        try:
            e = make_cocoeval(gt, dt, iou_type)
        finally:
            del os.environ["CONVMAE_COCOEVAL"]
        e.evaluate()
        e.accumulate()
        e.summarize()
        evals[backend] = e
    slow, fast = evals["pycocotools"], evals["faster_coco_eval"]
    assert isinstance(slow, COCOeval) and not isinstance(fast, COCOeval)
    assert len(fast.stats) == 12
    np.testing.assert_allclose(fast.stats, slow.stats, rtol=0, atol=1e-6)
    assert 0.05 < slow.stats[0] < 0.9  # a real AP, not a degenerate all-zero evaluation
    np.testing.assert_allclose(fast.eval["precision"], slow.eval["precision"], rtol=0, atol=1e-6)


def test_coco_evaluator_results_equal_detectron2_own_path(synthetic):
    ours = coco_evaluator_stats(synthetic, None)
    ours_pycocotools = coco_evaluator_stats(synthetic, "pycocotools")
    detectron2 = coco_evaluator_stats(synthetic, "detectron2")
    for task in ("bbox", "segm"):
        assert set(ours[task]) == set(detectron2[task])
        assert {k for k in ours[task] if k.startswith("AP-")} == {
            f"AP-class{c}" for c in (1, 3, 7, 12)
        }
        for key, value in detectron2[task].items():
            assert ours[task][key] == pytest.approx(value, abs=1e-4), (task, key)
            assert ours_pycocotools[task][key] == pytest.approx(value, abs=1e-4), (task, key)


def test_coco_evaluator_uses_faster_coco_eval_by_default_and_says_so(synthetic, caplog):
    assert coco_evaluation._evaluate_predictions_on_coco is evaluate_predictions_on_coco
    assert coco_evaluation.COCOeval_opt is make_cocoeval
    assert cocoeval_backend() == "faster_coco_eval"
    with caplog.at_level(logging.INFO, logger="convmae_det.evaluation.coco_backend"):
        coco_evaluator_stats(synthetic, None)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("coco_backend")]
    assert any("(bbox): faster-coco-eval" in m for m in lines)
    assert any("(segm): faster-coco-eval" in m for m in lines)


def test_pycocotools_is_chosen_by_the_environment_or_without_the_package(monkeypatch, caplog):
    monkeypatch.setenv("CONVMAE_COCOEVAL", "pycocotools")
    assert cocoeval_backend() == "pycocotools"
    monkeypatch.setenv("CONVMAE_COCOEVAL", "fast please")
    with pytest.raises(ValueError, match="CONVMAE_COCOEVAL='fast please'; expected one of"):
        cocoeval_backend()
    monkeypatch.delenv("CONVMAE_COCOEVAL")
    monkeypatch.setattr(coco_backend, "_faster_coco_eval", lambda: None)
    assert cocoeval_backend() == "pycocotools"
    monkeypatch.setenv("CONVMAE_COCOEVAL", "faster_coco_eval")
    with pytest.raises(ValueError, match="pip install faster-coco-eval"):
        cocoeval_backend()


def test_use_fast_impl_false_keeps_detectron2_official_path(synthetic, monkeypatch):
    """COCOEvaluator(use_fast_impl=False) passes pycocotools' COCOeval: detectron2's own code runs."""
    calls = []
    original = coco_backend._original["evaluate"]
    monkeypatch.setitem(
        coco_backend._original,
        "evaluate",
        lambda *a, **k: calls.append(a[4]) or original(*a, **k),
    )
    gt = COCO()
    gt.dataset = json.loads(json.dumps(synthetic.gt))
    gt.createIndex()
    evaluate_predictions_on_coco(gt, _results_json(synthetic), "bbox", cocoeval_fn=COCOeval)
    assert calls == [COCOeval]


def test_benchmark_tool_times_both_paths_and_reports_the_speedup(tmp_path):
    out = tmp_path / "coco_eval.json"
    proc = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--coco-eval", "20", "--iters", "1",
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "speedup" in proc.stdout and "largest AP difference" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"detectron2", "pycocotools", "faster_coco_eval"}
    assert result["num_images"] == 20 and result["largest_ap_difference"] < 1e-4
    assert result["speedup"] > 0
