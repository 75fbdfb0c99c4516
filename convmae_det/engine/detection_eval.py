"""Detection evaluation that names bad test images and survives bad ground truth: the test loader
and the COCO evaluator of the LazyConfigs (``configs/common/*loader*.py``).

Test images. :func:`build_checked_test_loader` is detectron2's ``build_detection_test_loader``
(same arguments) whose samples that cannot be read (truncated, not an image, missing) are named
instead of ending evaluation with a bare ``OSError``. A skipped image would change the metric
without anyone noticing, so by default evaluation stops: :class:`BadTestImageError` (one line:
the file, the cause, what to do; the tools exit with code 2 and no traceback). With
``dataloader.test.skip_bad_samples=True`` each bad image is logged, left out of the metrics on
both sides (COCO evaluation scores only the images that have predictions, so its ground truth is
not counted as missed either), and :class:`CheckedCOCOEvaluator` reports
``skipped_test_images`` (and logs the files) in the results, thus in ``final_metrics.json``.

Ground truth. detectron2's ``COCOEvaluator`` reads the dataset's json file with the COCO API;
pycocotools fails on a first polygon of 2 points (``Argument 'bb' has incorrect type``) or an
empty segmentation list, after a whole training run. :class:`CheckedCOCOEvaluator` scores a
cleaned copy instead (:func:`convmae_det.data.annotation_checks.clean_coco_ground_truth`:
malformed polygons removed, unusable annotations turned into ignored regions) and says so in one
warning naming the file and the annotation ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, coco_evaluation
from detectron2.utils import comm

from ..data.annotation_checks import (
    clean_coco_ground_truth,
    coco_annotation_problems,
    describe_problems,
)
from ..data.detection_mapper import image_error_reason
from .launcher import DataFileError

__all__ = [
    "BadTestImageError",
    "CheckedCOCOEvaluator",
    "CheckedTestLoader",
    "build_checked_test_loader",
    "skipped_test_images",
]

logger = logging.getLogger(__name__)


@dataclass
class _LastPass:
    """The last pass of a CheckedTestLoader in this process, read by
    CheckedCOCOEvaluator.evaluate() (the config builds the loader and the evaluator apart)."""

    skip_mode: bool = False
    skipped: List[tuple] = field(default_factory=list)  # (file, reason)


_LAST_PASS = _LastPass()


class BadTestImageError(DataFileError):
    """A test image that cannot be read, evaluation not set to skip it; one line naming it."""


@dataclass(frozen=True)
class _BadSample:
    """What the mapper returns for a sample it could not read (picklable, from workers)."""

    file_name: str
    reason: str
    detail: str


class _NamingMapper:
    """Calls ``mapper``; a sample whose reading fails becomes a :class:`_BadSample`."""

    def __init__(self, mapper: Callable[[Dict[str, Any]], Any]):
        self.mapper = mapper

    def __call__(self, record: Dict[str, Any]) -> Any:
        try:
            return self.mapper(record)
        except OSError as exc:
            file_name = str(record.get("file_name", record.get("image_id", "?")))
            reason = getattr(exc, "reason", None) or image_error_reason(exc)
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            return _BadSample(file_name, reason, detail.splitlines()[0])


class CheckedTestLoader:
    """Iterates over a detectron2 test loader, removing the samples that could not be read:
    :class:`BadTestImageError` for the first one, or, with ``skip_bad_samples``, a warning per
    file and the file in :func:`skipped_test_images`. ``len()`` is the inner loader's."""

    def __init__(self, loader: Any, *, skip_bad_samples: bool = False):
        self.loader = loader
        self.skip_bad_samples = bool(skip_bad_samples)
        self.skipped: List[tuple] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        self.skipped = []
        _LAST_PASS.skip_mode, _LAST_PASS.skipped = self.skip_bad_samples, self.skipped
        for batch in self.loader:
            good = []
            for sample in batch:
                if not isinstance(sample, _BadSample):
                    good.append(sample)
                    continue
                if not self.skip_bad_samples:
                    raise BadTestImageError(
                        f"test image {sample.file_name}: cannot read the image: {sample.reason} "
                        f"({sample.detail}). Replace it or remove it from the test set, or set "
                        "dataloader.test.skip_bad_samples=True to evaluate without it (counted "
                        "as skipped_test_images in the results)"
                    )
                logger.warning(
                    f"Skipped test image {sample.file_name}: {sample.reason} ({sample.detail}); "
                    "it is left out of the metrics"
                )
                self.skipped.append((sample.file_name, sample.reason))
            if good:
                yield good


def build_checked_test_loader(
    dataset: Any, *, mapper: Callable[[Dict[str, Any]], Any], skip_bad_samples: bool = False,
    **kwargs: Any,
) -> CheckedTestLoader:  # fmt: skip
    """:func:`detectron2.data.build_detection_test_loader` (``dataset``, ``mapper``,
    ``num_workers``, ``batch_size``, ...) whose unreadable samples stop evaluation naming the
    file, or are skipped and counted with ``skip_bad_samples`` (see the module docstring)."""
    loader = build_detection_test_loader(dataset, mapper=_NamingMapper(mapper), **kwargs)
    return CheckedTestLoader(loader, skip_bad_samples=skip_bad_samples)


def skipped_test_images() -> List[tuple]:
    """(file, reason) of the test images skipped by the last pass of a
    :class:`CheckedTestLoader` in this process."""
    return list(_LAST_PASS.skipped)


class CheckedCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` (same arguments) that scores a cleaned ground truth when the
    json file has malformed annotations, and reports the test images the loader skipped
    (``skipped_test_images`` in the results, when the loader skips). See the module docstring."""

    def __init__(self, dataset_name: str, *args: Any, **kwargs: Any):
        super().__init__(dataset_name, *args, **kwargs)
        self._dataset_name = dataset_name
        dataset = getattr(self._coco_api, "dataset", None) or {}
        problems = coco_annotation_problems(dataset)
        if not problems:
            return
        cleaned, counts = clean_coco_ground_truth(dataset, problems)
        self._logger.warning(
            f"Evaluation ground truth of '{dataset_name}' ({self._metadata.json_file}): "
            f"{len(problems)} malformed annotation(s) that the COCO API cannot score as written; "
            f"{counts['ignored']} scored as ignored regions, {counts['removed']} removed, "
            f"{counts['polygons_removed']} malformed polygon(s) removed: "
            f"{describe_problems(problems)}"
        )
        self._coco_api = _coco_from_dict(cleaned)

    def evaluate(self, img_ids: Optional[List[int]] = None) -> Dict[str, Any]:
        skip_mode, skipped = _LAST_PASS.skip_mode, list(_LAST_PASS.skipped)
        skipped = comm.all_gather(skipped) if self._distributed else [skipped]
        results = super().evaluate(img_ids)
        if not comm.is_main_process():
            return results
        skipped = [s for part in skipped for s in part]
        if skipped:
            listed = ", ".join(f"{os.path.basename(f)} ({r})" for f, r in skipped[:20])
            more = f", ... ({len(skipped) - 20} more)" if len(skipped) > 20 else ""
            self._logger.warning(
                f"Evaluation of '{self._dataset_name}' skipped {len(skipped)} test image(s) that "
                f"could not be read (not in the metrics): {listed}{more}"
            )
        if skip_mode or skipped:
            results = dict(results or {})
            results["skipped_test_images"] = float(len(skipped))
        return results


def _coco_from_dict(dataset: Dict[str, Any]) -> Any:
    """A COCO API object of the backend ``COCOEvaluator`` uses (``coco_evaluation.COCO``, which
    convmae_det may point at faster-coco-eval), built from a json written for it."""
    with tempfile.TemporaryDirectory(prefix="convmae_det_gt_") as tmp:
        path = os.path.join(tmp, "ground_truth.json")
        with open(path, "w") as f:
            json.dump(dataset, f)
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_evaluation.COCO(path)
