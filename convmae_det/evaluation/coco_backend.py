"""Which ``COCOeval`` computes COCO AP: faster-coco-eval (C++) when it imports, else pycocotools.

The detectron2 snapshot we install has no compiled ``_C``, so its ``COCOEvaluator`` falls back to
pycocotools' pure-Python ``COCOeval``: minutes per evaluation of COCO val with masks, at every
evaluation period. faster-coco-eval is a maintained C++ implementation with the pycocotools API
and the same numbers (``tests/test_coco_eval_backend.py`` compares all 12 bbox and 12 segm stats
on a synthetic evaluation with crowds, empty images and every area range).

:func:`use_fast_cocoeval` (applied when ``convmae_det`` is imported, see ``compat.py``) makes
detectron2's ``COCOEvaluator`` use it: the ground truth and the detections are loaded by
pycocotools as before, then indexed by faster-coco-eval (no copy) and scored by its
``COCOeval_faster``; detectron2's deep copy of every detection before mask AP is replaced by a
shallow one. With ``CONVMAE_COCOEVAL=pycocotools`` in the environment (or without the package)
pycocotools scores them. Either way one log line per evaluated task says which backend ran.

    make_cocoeval(coco_gt, coco_dt, "segm")  # what COCOEvaluator calls; evaluate/accumulate/...
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional

__all__ = [
    "COCOEVAL_BACKENDS",
    "cocoeval_backend",
    "detectron2_cocoeval",
    "evaluate_predictions_on_coco",
    "make_cocoeval",
    "use_fast_cocoeval",
]

logger = logging.getLogger(__name__)

COCOEVAL_BACKENDS = ("faster_coco_eval", "pycocotools")
_ENV = "CONVMAE_COCOEVAL"


def _faster_coco_eval():
    try:
        import faster_coco_eval
        from faster_coco_eval import COCO, COCOeval_faster  # noqa: F401
    except ImportError:
        return None
    return faster_coco_eval


def cocoeval_backend() -> str:
    """ "faster_coco_eval" when that package imports and ``CONVMAE_COCOEVAL`` does not ask for
    "pycocotools"; otherwise "pycocotools".

    Raises:
        ValueError: ``CONVMAE_COCOEVAL`` names no known backend, or asks for faster_coco_eval
            when it is not installed.
    """
    wanted = os.environ.get(_ENV, "").strip().lower() or "auto"
    if wanted not in ("auto",) + COCOEVAL_BACKENDS:
        raise ValueError(f"{_ENV}={wanted!r}; expected one of auto, {', '.join(COCOEVAL_BACKENDS)}")
    available = _faster_coco_eval() is not None
    if wanted == "faster_coco_eval" and not available:
        raise ValueError(
            f"{_ENV}=faster_coco_eval, but the package is not installed: "
            "pip install faster-coco-eval"
        )
    if wanted == "pycocotools" or not available:
        return "pycocotools"
    return "faster_coco_eval"


_converted: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _as_faster_coco(coco: Any) -> Any:
    """faster-coco-eval's ``COCO`` over the same dataset dict (no copy), made once per object:
    the ground truth is converted once per evaluator, not once per task."""
    from faster_coco_eval import COCO

    if isinstance(coco, COCO):
        return coco
    if coco not in _converted:
        _converted[coco] = COCO(coco.dataset)
    return _converted[coco]


def make_cocoeval(coco_gt: Any, coco_dt: Any, iou_type: str) -> Any:
    """A ``COCOeval`` of the selected backend for ``coco_gt`` / ``coco_dt`` (pycocotools or
    faster-coco-eval ``COCO`` objects), with the pycocotools interface: ``params``,
    ``evaluate()``, ``accumulate()``, ``summarize()``, ``stats`` (12 values) and
    ``eval["precision"]`` (T x R x K x A x M)."""
    backend = cocoeval_backend()
    if backend == "faster_coco_eval":
        fce = _faster_coco_eval()
        logger.info("COCO evaluation (%s): faster-coco-eval %s (C++)", iou_type, fce.__version__)
        return fce.COCOeval_faster(_as_faster_coco(coco_gt), _as_faster_coco(coco_dt), iou_type)
    from pycocotools.cocoeval import COCOeval

    logger.info(
        "COCO evaluation (%s): pycocotools (pure Python; pip install faster-coco-eval for the "
        "C++ implementation)",
        iou_type,
    )
    if not isinstance(coco_gt, _pycocotools_coco()):
        raise TypeError("pycocotools COCOeval needs pycocotools COCO objects")
    return COCOeval(coco_gt, coco_dt, iou_type)


def _pycocotools_coco():
    from pycocotools.coco import COCO

    return COCO


def evaluate_predictions_on_coco(
    coco_gt: Any,
    coco_results: List[dict],
    iou_type: str,
    kpt_oks_sigmas: Optional[List[float]] = None,
    cocoeval_fn: Optional[Callable] = None,
    img_ids: Optional[List[int]] = None,
    max_dets_per_image: Optional[List[int]] = None,
) -> Any:
    """detectron2's ``_evaluate_predictions_on_coco`` (same arguments, same result) with the
    backend of :func:`make_cocoeval` and without its deep copy of every detection for "segm"
    (a shallow copy of each result without its "bbox", so that mask AP uses mask areas).
    Keypoints and a custom ``max_dets_per_image`` go to detectron2's own function."""
    custom_max_dets = max_dets_per_image is not None and max_dets_per_image[2] != 100
    if iou_type == "keypoints" or custom_max_dets or cocoeval_fn is _original["cocoeval_fn"]:
        return _original["evaluate"](
            coco_gt, coco_results, iou_type, kpt_oks_sigmas, cocoeval_fn or make_cocoeval,
            img_ids, max_dets_per_image,
        )  # fmt: skip
    if not coco_results:
        raise ValueError("no detections to evaluate")
    if iou_type == "segm":
        coco_results = [{k: v for k, v in r.items() if k != "bbox"} for r in coco_results]
    coco_dt = coco_gt.loadRes(coco_results)
    coco_eval = make_cocoeval(coco_gt, coco_dt, iou_type)
    coco_eval.params.maxDets = list(max_dets_per_image or [1, 10, 100])
    if img_ids is not None:
        coco_eval.params.imgIds = img_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as table:
        coco_eval.summarize()  # pycocotools prints its table; faster-coco-eval logs it
    if table.getvalue().strip():
        logger.info("COCOeval summary (%s):\n%s", iou_type, table.getvalue().rstrip())
    return coco_eval


_original: Dict[str, Any] = {}


def use_fast_cocoeval() -> bool:
    """Make detectron2's ``COCOEvaluator`` score with :func:`make_cocoeval` (faster-coco-eval
    when installed) through :func:`evaluate_predictions_on_coco`, when this detectron2 has no
    compiled fast COCOeval of its own. Returns True when patched (idempotent).

    The backend is chosen at each evaluation, so ``CONVMAE_COCOEVAL`` set later still counts;
    ``COCOEvaluator(..., use_fast_impl=False)`` still runs detectron2's own pycocotools path."""
    from detectron2.evaluation import coco_evaluation

    if coco_evaluation.COCOeval_opt is make_cocoeval:
        return True
    if getattr(coco_evaluation.COCOeval_opt, "__module__", "").startswith("detectron2"):
        return False  # a detectron2 built with _C: keep its own C++ COCOeval_opt
    _original["cocoeval_fn"] = coco_evaluation.COCOeval
    _original["cocoeval_opt"] = coco_evaluation.COCOeval_opt
    _original["evaluate"] = coco_evaluation._evaluate_predictions_on_coco
    coco_evaluation.COCOeval_opt = make_cocoeval
    coco_evaluation._evaluate_predictions_on_coco = evaluate_predictions_on_coco
    return True


@contextlib.contextmanager
def detectron2_cocoeval() -> Iterator[None]:
    """Within the block, ``COCOEvaluator`` runs exactly as the installed detectron2 ships it
    (pycocotools, deep copies): the baseline of ``tools/benchmark.py --coco-eval``."""
    from detectron2.evaluation import coco_evaluation

    if not _original:
        yield
        return
    patched = coco_evaluation.COCOeval_opt, coco_evaluation._evaluate_predictions_on_coco
    coco_evaluation.COCOeval_opt = _original["cocoeval_opt"]
    coco_evaluation._evaluate_predictions_on_coco = _original["evaluate"]
    try:
        yield
    finally:
        coco_evaluation.COCOeval_opt, coco_evaluation._evaluate_predictions_on_coco = patched
