# AdamW with our parameter groups: no weight decay on norms (every kind, detectron2's LayerNorm
# included), pos_embed and relative-position tables; layer-wise lr decay via lr_factor_func.
import torch
from detectron2.config import LazyCall as L

from convmae_det.engine.optim import get_param_groups

AdamW = L(torch.optim.AdamW)(
    params=L(get_param_groups)(
        # params.model is set to the model before instantiation
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        lr_factor_func=None,
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
