"""ImageNet classification on the ConvViT encoder: fine-tuning and linear probing.

:class:`ConvViTClassifierNet` is the official ConvMAE classifier
(``models_convvit.convvit_base_patch16(global_pool=True)``) on the shared :class:`ConvViT`:
stages 1-3, the stage-3 tokens averaged over the grid, ``fc_norm`` (LayerNorm, eps 1e-6) and a
linear ``head``. Its parameter names are the official ones (``patch_embed1..4``, ``blocks1..3``,
``pos_embed``, ``fc_norm``, ``head``), so an official fine-tuned file loads without renaming.
With ``linear_probe=True`` it is the linear-probing model of MAE / ConvMAE: the encoder and
``fc_norm`` frozen, ``head = Sequential(BatchNorm1d(affine=False, eps=1e-6), Linear)``.

:class:`ImageClassifier` is the detectron2-style meta-architecture around it: a list of dataset
dicts in, a loss dict out in training (mixup / cutmix and the recipe's criterion applied here),
per-image ``{"logits", "scores", "pred_class"}`` in evaluation.

Shapes (Base): images (B, 3, H, W), H and W multiples of 16 -> tokens (B, H/16, W/16, 768)
-> pooled (B, 768) -> logits (B, num_classes).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .convvit import ConvViT

__all__ = ["ConvViTClassifierNet", "ImageClassifier", "CLASSIFIER_HEAD_INIT_STD"]

CLASSIFIER_HEAD_INIT_STD = {"finetune": 2e-5, "linear_probe": 0.01}
"""Initial std of a fresh ``head.weight`` (trunc-normal): 2e-5 when fine-tuning (MAE / ConvMAE
``main_finetune.py``), 0.01 when linear probing (MoCo v3, as ``main_linprobe.py``)."""


class ConvViTClassifierNet(ConvViT):
    """ConvViT + global average pool + ``fc_norm`` + ``head`` (official key names).

    Args:
        num_classes: classes of ``head``.
        fc_norm_eps: eps of the LayerNorm after pooling (official: 1e-6).
        linear_probe: freeze the encoder and ``fc_norm``; the head becomes
            ``Sequential(BatchNorm1d(dim, affine=False, eps=1e-6), Linear(dim, num_classes))``.
        head_init_std: std of the trunc-normal init of ``head.weight`` (bias zero); default
            :data:`CLASSIFIER_HEAD_INIT_STD` of the mode.
        **kwargs: :class:`ConvViT` arguments (Base by default; ``drop_path_rate``, the LayerNorm
            eps, ``pos_embed_hw`` for the stored table: (14, 14) for 224 fine-tuning, a larger
            input resizes it bicubically). A classifier has no final ``norm``.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        fc_norm_eps: float = 1e-6,
        linear_probe: bool = False,
        head_init_std: Optional[float] = None,
        **kwargs: Any,
    ):
        if kwargs.get("final_norm"):
            raise ValueError("ConvViTClassifierNet has fc_norm after pooling, not a final norm")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes={num_classes!r}; expected a positive class count")
        super().__init__(**kwargs)
        dim = self.embed_dims[-1]
        self.num_classes = int(num_classes)
        self.linear_probe = bool(linear_probe)
        self.fc_norm = nn.LayerNorm(dim, eps=fc_norm_eps)
        linear = nn.Linear(dim, self.num_classes)
        if head_init_std is None:
            head_init_std = CLASSIFIER_HEAD_INIT_STD["linear_probe" if linear_probe else "finetune"]
        trunc_normal_(linear.weight, std=head_init_std)
        nn.init.zeros_(linear.bias)
        if self.linear_probe:
            bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
            self.head = nn.Sequential(bn, linear)
            for p in self.parameters():
                p.requires_grad_(False)
            for p in self.head.parameters():
                p.requires_grad_(True)
        else:
            self.head = linear

    @property
    def head_linear(self) -> nn.Linear:
        """The linear layer of the head (``head`` or ``head[1]`` when linear probing)."""
        return self.head[1] if self.linear_probe else self.head

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C3) pooled, ``fc_norm``-ed features."""
        tokens = self.forward_features(x)["e3"]  # (B, C3, H/16, W/16)
        return self.fc_norm(tokens.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, 3, H, W) normalised images, H and W multiples of 16 -> logits (B, num_classes)."""
        return self.head(self.forward_pooled(x))

    def train(self, mode: bool = True) -> "ConvViTClassifierNet":
        # A linear probe's encoder is frozen: keep it in eval mode (no drop path); the head's
        # BatchNorm follows ``mode``.
        super().train(mode)
        if self.linear_probe and mode:
            for name, child in self.named_children():
                if name != "head":
                    child.eval()
        return self


class ImageClassifier(nn.Module):
    """Image classification meta-architecture (detectron2 style).

    Args:
        net: the classifier ``(B, 3, H, W) -> (B, num_classes)``, e.g.
            :class:`ConvViTClassifierNet`.
        criterion: training loss ``(logits (B, K) fp32, targets) -> scalar``: the recipe's
            ``timm.loss.SoftTargetCrossEntropy`` with mixup, ``LabelSmoothingCrossEntropy``, or
            ``nn.CrossEntropyLoss`` (default).
        mixup: optional ``timm.data.Mixup`` applied to each process's batch in training (it turns
            the labels into soft targets; its ``num_classes`` must equal the net's).

    Inputs: a list of dicts with ``"image"`` (3, H, W) float tensor, already normalised by the
    data mapper (all images of a batch have one size), and ``"label"`` (int) in training.
    Training returns ``{"loss_cls": loss}``; evaluation a list with one dict per image:
    ``"logits"`` (K,), ``"scores"`` (K,) softmax probabilities (fp32), ``"pred_class"`` (0-dim
    int64).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        mixup: Optional[Callable] = None,
    ):
        super().__init__()
        self.net = net
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.mixup = mixup
        if mixup is not None and not (
            getattr(mixup, "mixup_alpha", 1.0) > 0
            or getattr(mixup, "cutmix_alpha", 1.0) > 0
            or getattr(mixup, "cutmix_minmax", None) is not None
        ):
            raise ValueError(
                "mixup with mixup_alpha=0 and cutmix_alpha=0 mixes nothing: set model.mixup=None "
                "(and a LabelSmoothingCrossEntropy / CrossEntropyLoss criterion) instead"
            )
        classes = getattr(net, "num_classes", None)
        mix_classes = getattr(mixup, "num_classes", None)
        if mixup is not None and classes is not None and mix_classes != classes:
            raise ValueError(
                f"mixup.num_classes={mix_classes} but the classifier has {classes} classes; "
                "set both to the dataset's class count"
            )

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _images(self, batched_inputs: Sequence[Dict[str, Any]]) -> torch.Tensor:
        images = [d["image"] for d in batched_inputs]
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) > 1:
            raise ValueError(
                f"images of one batch must share a size (the data transform crops them); got "
                f"{sorted(sizes)}"
            )
        return torch.stack(images).to(self.device, non_blocking=True).float()

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        images = self._images(batched_inputs)
        if not self.training:
            logits = self.net(images)
            scores = F.softmax(logits.float(), dim=-1)
            pred = scores.argmax(dim=-1)
            return [
                {"logits": logits[i], "scores": scores[i], "pred_class": pred[i]}
                for i in range(len(batched_inputs))
            ]
        targets = torch.as_tensor(
            [int(d["label"]) for d in batched_inputs], dtype=torch.long, device=self.device
        )
        if self.mixup is not None:
            if len(batched_inputs) % 2:
                raise ValueError(
                    f"mixup / cutmix pair the images of a batch: the batch per process must be "
                    f"even, got {len(batched_inputs)} (change dataloader.train.total_batch_size "
                    "or the number of processes)"
                )
            images, targets = self.mixup(images, targets)
        logits = self.net(images)
        return {"loss_cls": self.criterion(logits.float(), targets)}
