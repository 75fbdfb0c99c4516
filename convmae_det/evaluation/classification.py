"""Top-k accuracy and cross-entropy of an image classifier, over all processes.

:class:`ClassificationEvaluator` is a detectron2 ``DatasetEvaluator`` for the per-image outputs of
:class:`convmae_det.modeling.classifier.ImageClassifier` (``{"logits": (K,), ...}``) and the
dataset dicts they came from (``"label"``, ``"image_id"``, ``"file_name"``). Each process keeps,
per image, its id, its label, its top-``max(topk)`` classes and the cross-entropy of its logits
(fp32); ``evaluate`` gathers them on the main process, keeps every ``image_id`` once and checks
the count against the registered dataset, so that images a sampler dropped or repeated show up
in the log instead of silently shifting the accuracy.

    evaluator = ClassificationEvaluator("imagenet_val", output_dir=out)
    inference_on_dataset(model, test_loader, evaluator)
    # main process: {"classification": {"top1": 83.1, "top5": 96.5, "loss": 0.78,
    #                                   "num_images": 50000}}; other processes: {}
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..checkpoint.io import write_text_atomic

__all__ = ["ClassificationEvaluator", "PREDICTIONS_FILE"]

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "classification_predictions.json"
"""Name of the per-image predictions written into ``output_dir``."""

_MAX_IDS_SHOWN = 10


class _Prediction(NamedTuple):
    """What one process keeps of one image (small: it is pickled to the main process)."""

    image_id: int
    label: int
    topk: Tuple[int, ...]  # the top-max(k) classes, best first (fewer when K < max(k))
    loss: float  # cross-entropy of the logits against the label, fp32
    file_name: Optional[str]


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy (%), mean cross-entropy and image count of a classifier.

    Args:
        dataset_name: the evaluated dataset. When it is registered in ``DatasetCatalog``, the
            number of distinct images evaluated is compared with the dataset's length (read once
            per evaluator) and a shortfall is logged as a warning naming the missing count.
        topk: the k of the reported ``top{k}`` accuracies; a k above the class count counts
            as k = classes (every image is then correct).
        distributed: gather the predictions of all processes on the main one (the process
            group must exist when ``evaluate`` runs). With False each process scores its own.
        output_dir: if given, the main process writes the per-image predictions (``image_id``,
            ``label``, ``topk``, ``loss``, ``file_name``; sorted by ``image_id``) to
            ``<output_dir>/classification_predictions.json``, atomically.

    Inputs to :meth:`process`: the dataset dicts (``"image_id"`` int, unique in the split, and
    ``"label"`` int in ``[0, K)``) and the model's outputs (``"logits"`` (K,) tensors).

    ``evaluate`` returns, on the main process, ``{"classification": {"top1": %, "top5": %,
    "loss": mean CE, "num_images": n}}`` (one ``top{k}`` per k); ``{}`` on the other processes
    and when no image was evaluated (with a warning).
    """

    def __init__(
        self,
        dataset_name: Optional[str] = None,
        *,
        topk: Sequence[int] = (1, 5),
        distributed: bool = True,
        output_dir: Optional[str] = None,
    ):
        ks: List[int] = []
        for k in topk:
            if isinstance(k, bool) or int(k) != k or int(k) < 1:
                raise ValueError(f"topk={tuple(topk)!r}; every k must be a positive integer")
            if int(k) not in ks:
                ks.append(int(k))
        if not ks:
            raise ValueError("topk is empty; give at least one k, e.g. (1, 5)")
        self._dataset_name = dataset_name
        self._topk: Tuple[int, ...] = tuple(ks)
        self._max_k = max(ks)
        self._distributed = distributed
        self._output_dir = output_dir
        self._expected: Optional[Tuple[int, Optional[Set[int]]]] = None
        self._predictions: List[_Prediction] = []

    @property
    def topk(self) -> Tuple[int, ...]:
        return self._topk

    def reset(self) -> None:
        self._predictions = []

    def process(
        self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]
    ) -> None:
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        if not inputs:
            return
        missing = [key for key in ("image_id", "label") if key not in inputs[0]]
        if missing:
            raise KeyError(
                f"the evaluator needs {missing} in every dataset dict (the test mapper must keep "
                f"them); got keys {sorted(inputs[0].keys())}"
            )
        if "logits" not in outputs[0]:
            raise KeyError(f"model outputs need 'logits'; got keys {sorted(outputs[0].keys())}")
        logits = torch.stack([out["logits"].detach() for out in outputs]).float()  # (B, K)
        num_classes = logits.shape[-1]
        labels = [int(inp["label"]) for inp in inputs]
        bad = [
            (int(inp["image_id"]), y) for inp, y in zip(inputs, labels) if not 0 <= y < num_classes
        ]
        if bad:
            raise ValueError(
                f"labels outside [0, {num_classes}) for (image_id, label) {bad[:_MAX_IDS_SHOWN]}: "
                "the dataset's classes do not match the model's head"
            )
        target = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
        losses = F.cross_entropy(logits, target, reduction="none").tolist()
        top = logits.topk(min(self._max_k, num_classes), dim=-1).indices.tolist()
        for inp, label, classes, loss in zip(inputs, labels, top, losses):
            name = inp.get("file_name")
            self._predictions.append(
                _Prediction(
                    int(inp["image_id"]),
                    label,
                    tuple(classes),
                    float(loss),
                    None if name is None else str(name),
                )
            )

    # ----------------------------------------------------------------------------- evaluate
    def evaluate(self) -> Dict[str, Dict[str, float]]:
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = list(itertools.chain.from_iterable(gathered))
        else:
            predictions = list(self._predictions)
        if not predictions:
            logger.warning(
                f"ClassificationEvaluator{self._for_dataset()} received no predictions: nothing "
                "to score (is the test loader empty?)"
            )
            return {}
        predictions = self._unique(predictions)
        self._check_count(predictions)
        if self._output_dir:
            self._save(predictions)
        return {"classification": self._metrics(predictions)}

    def _for_dataset(self) -> str:
        return f" of {self._dataset_name!r}" if self._dataset_name else ""

    def _unique(self, predictions: List[_Prediction]) -> List[_Prediction]:
        """One prediction per image_id (the first seen), sorted by image_id."""
        by_id: Dict[int, _Prediction] = {}
        for p in predictions:
            by_id.setdefault(p.image_id, p)
        duplicates = len(predictions) - len(by_id)
        if duplicates:
            logger.warning(
                f"ClassificationEvaluator{self._for_dataset()}: {duplicates} duplicate "
                f"prediction(s) of the same image_id dropped ({len(predictions)} received, "
                f"{len(by_id)} distinct images). The test sampler gave some images to more than "
                "one process, or image_id is not unique in the split; each image counts once."
            )
        return [by_id[i] for i in sorted(by_id)]

    def _expected_images(self) -> Optional[Tuple[int, Optional[Set[int]]]]:
        """(length, image_ids or None) of the registered dataset; None when it is unknown."""
        if self._expected is None and self._dataset_name:
            if self._dataset_name not in DatasetCatalog.list():
                logger.info(
                    f"ClassificationEvaluator: dataset {self._dataset_name!r} is not registered; "
                    "the image count is not checked"
                )
                return None
            dicts = DatasetCatalog.get(self._dataset_name)
            ids: Optional[Set[int]] = None
            if all("image_id" in d for d in dicts):
                ids = {int(d["image_id"]) for d in dicts}
            self._expected = (len(dicts), ids)
        return self._expected

    def _check_count(self, predictions: List[_Prediction]) -> None:
        expected = self._expected_images()
        if expected is None:
            return
        length, ids = expected
        seen = {p.image_id for p in predictions}
        where = f"ClassificationEvaluator{self._for_dataset()}"
        if len(seen) < length:
            example = ""
            if ids is not None:
                absent = sorted(ids - seen)[:_MAX_IDS_SHOWN]
                example = f" (e.g. image_id {absent})" if absent else ""
            logger.warning(
                f"{where}: {length - len(seen)} of the dataset's {length} images were not "
                f"evaluated{example}; the metrics cover {len(seen)} images. A loader that drops "
                "the last incomplete batch, or a sampler that does not cover the split, loses "
                "images at the end of a split."
            )
        if ids is not None:
            foreign = sorted(seen - ids)
            if foreign:
                logger.warning(
                    f"{where}: {len(foreign)} evaluated image_id(s) are not in the dataset "
                    f"(e.g. {foreign[:_MAX_IDS_SHOWN]}); the metrics include them"
                )
        elif len(seen) > length:
            logger.warning(
                f"{where}: {len(seen)} distinct images evaluated but the dataset has {length}"
            )

    def _metrics(self, predictions: List[_Prediction]) -> Dict[str, float]:
        n = len(predictions)
        classes = min(len(p.topk) for p in predictions)
        if classes < self._max_k:
            over = [k for k in self._topk if k > classes]
            logger.info(
                f"ClassificationEvaluator: the model has {classes} classes; "
                f"{', '.join(f'top{k}' for k in over)} count as top{classes}"
            )
        metrics: Dict[str, float] = {}
        for k in self._topk:
            correct = sum(1 for p in predictions if p.label in p.topk[:k])
            metrics[f"top{k}"] = 100.0 * correct / n
        metrics["loss"] = math.fsum(p.loss for p in predictions) / n
        metrics["num_images"] = n
        return metrics

    def _save(self, predictions: List[_Prediction]) -> None:
        path = os.path.join(self._output_dir, PREDICTIONS_FILE)
        rows = [p._asdict() for p in predictions]
        for row in rows:
            row["topk"] = list(row["topk"])
        write_text_atomic(json.dumps(rows), path)
        logger.info(f"Saved {len(rows)} per-image classification predictions to {path}")
