"""Compare the predictions of an exported model with those of eager PyTorch.

Both sides are predictor outputs: ``{"instances": Instances}`` (boxes, classes, scores, masks at
the original image size) or ``{"sem_seg": (K, H, W) scores}``. The default
:class:`Tolerances` are the deployment acceptance criteria of docs/DEPLOYMENT.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["Comparison", "Tolerances", "compare_predictions"]


@dataclass(frozen=True)
class Tolerances:
    """Acceptance criteria: boxes within ``box_rel`` relative (of max(|coordinate|, 1)), the
    same classes, scores within ``score_abs``, mask IoU >= ``mask_iou`` for every instance,
    semantic maps (argmax) equal on >= ``pixel_agreement`` of the pixels."""

    box_rel: float = 1e-3
    score_abs: float = 1e-4
    mask_iou: float = 0.99
    pixel_agreement: float = 0.999


@dataclass
class Comparison:
    """How close two predictions are. Detector fields are None for segmenters and vice versa.

    Attributes:
        task: "instances" or "sem_seg".
        eager_count, exported_count: number of instances.
        max_box_rel: largest box coordinate difference / max(|eager coordinate|, 1).
        classes_equal: every instance paired with one of the same class (see
            :func:`compare_predictions`).
        max_score_abs: largest score difference.
        min_mask_iou: smallest IoU of the pasted masks of one instance (1.0 without instances).
        pixel_agreement: fraction of pixels with the same argmax class.
        max_logit_abs: largest difference of the (K, H, W) scores.
    """

    task: str
    eager_count: int = 0
    exported_count: int = 0
    max_box_rel: Optional[float] = None
    classes_equal: Optional[bool] = None
    paired: Optional[int] = None
    max_score_abs: Optional[float] = None
    min_mask_iou: Optional[float] = None
    pixel_agreement: Optional[float] = None
    max_logit_abs: Optional[float] = None

    def ok(self, tol: Tolerances = Tolerances()) -> bool:
        """Whether the exported prediction meets ``tol``."""
        if self.task == "sem_seg":
            return self.pixel_agreement is not None and self.pixel_agreement >= tol.pixel_agreement
        if self.eager_count != self.exported_count:
            return False
        if self.eager_count == 0:
            return True
        return (
            bool(self.classes_equal)
            and self.max_box_rel is not None
            and self.max_box_rel <= tol.box_rel
            and self.max_score_abs is not None
            and self.max_score_abs <= tol.score_abs
            and (self.min_mask_iou is None or self.min_mask_iou >= tol.mask_iou)
        )

    def summary(self) -> str:
        """One line, e.g. ``50 = 50 instances, classes equal, boxes 3.1e-06 rel, ...``."""
        if self.task == "sem_seg":
            return (
                f"semantic map equal on {100.0 * (self.pixel_agreement or 0.0):.3f}% of pixels, "
                f"scores within {self.max_logit_abs:.1e}"
            )
        head = f"{self.eager_count} eager / {self.exported_count} exported instances"
        if self.eager_count != self.exported_count or self.eager_count == 0:
            return head
        if not self.classes_equal:
            return f"{head}, only {self.paired or 0} paired by class, score and box"
        mask = "" if self.min_mask_iou is None else f", mask IoU >= {self.min_mask_iou:.4f}"
        return (
            f"{head}, classes equal, boxes within "
            f"{self.max_box_rel:.1e} rel, scores within {self.max_score_abs:.1e}{mask}"
        )

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _mask_ious(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).bool(), b.flatten(1).bool()
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _match(x: Any, y: Any, score_window: float) -> List[Tuple[int, int]]:
    """Pairs (i, j) of instances of ``x`` and ``y`` with the same class, scores within
    ``score_window`` and the largest box IoU first (each instance in one pair at most). Instances
    of equal score may come in either order from the two runtimes' sorts."""
    from detectron2.structures import pairwise_iou

    iou = pairwise_iou(x.pred_boxes, y.pred_boxes)
    same = x.pred_classes[:, None] == y.pred_classes[None, :]
    close = (x.scores[:, None].double() - y.scores[None, :].double()).abs() <= score_window
    iou = torch.where(same & close, iou, torch.full_like(iou, -1.0))
    pairs: List[Tuple[int, int]] = []
    if iou.numel() == 0:
        return pairs
    order = torch.argsort(iou.flatten(), descending=True, stable=True)
    used_x, used_y = set(), set()
    for k in order.tolist():
        i, j = divmod(k, iou.shape[1])
        if iou[i, j] < 0:
            break
        if i not in used_x and j not in used_y:
            used_x.add(i)
            used_y.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def compare_predictions(
    eager: Dict[str, Any], exported: Dict[str, Any], *, score_window: float = 1e-3
) -> Comparison:
    """Compare two predictor outputs of the same image.

    Instances are paired by class, score (within ``score_window``) and box IoU, so that ties in
    score may come in either order; ``classes_equal`` is True when every instance of both sides
    found its pair, and the box / score / mask figures are over the pairs.
    """
    if "sem_seg" in eager:
        a, b = eager["sem_seg"].float().cpu(), exported["sem_seg"].float().cpu()
        if a.shape != b.shape:
            return Comparison("sem_seg", pixel_agreement=0.0, max_logit_abs=float("inf"))
        agree = (a.argmax(0) == b.argmax(0)).double().mean().item()
        return Comparison(
            "sem_seg", pixel_agreement=agree, max_logit_abs=(a - b).abs().max().item()
        )
    x, y = eager["instances"].to("cpu"), exported["instances"].to("cpu")
    out = Comparison("instances", eager_count=len(x), exported_count=len(y))
    if len(x) != len(y) or len(x) == 0:
        return out
    pairs = _match(x, y, score_window)
    out.paired = len(pairs)
    out.classes_equal = len(pairs) == len(x)
    if not pairs:
        return out
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    bx, by = x.pred_boxes.tensor[i].double(), y.pred_boxes.tensor[j].double()
    out.max_box_rel = ((bx - by).abs() / bx.abs().clamp(min=1.0)).max().item()
    out.max_score_abs = (x.scores[i].double() - y.scores[j].double()).abs().max().item()
    if x.has("pred_masks") and y.has("pred_masks"):
        out.min_mask_iou = _mask_ious(x.pred_masks[i], y.pred_masks[j]).min().item()
    return out
