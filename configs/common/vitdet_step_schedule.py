# ViTDet's step schedule, shared by the ViTDet-style recipes: 184,375 iterations, lr x0.1 at
# 163,889 (88.9 %) and x0.01 at 177,546 (96.3 %), 250 linear warm-up iterations.
#   184,375 it x 64 img = 100 COCO epochs (ViTDet-B); x 16 img = 25 epochs (ConvMAE ViTDet-style)
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=max_iter,
    ),
    warmup_length=250 / max_iter,
    warmup_factor=0.001,
)
