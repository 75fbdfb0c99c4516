# Paper recipe (ConvMAE, Table: COCO Mask R-CNN 25 ep, 53.2 box / 47.1 mask AP):
# AdamW lr 8e-5, wd 0.1, batch 32, cosine, drop path 0.1, LSJ 1024, no layer decay.
# 25 ep = 92187 iters * 32 images/iter / 118000 images/ep
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from ..common.coco_loader_lsj import dataloader
from ..common.models.mask_rcnn_convvitdet import model
from ..common.optim import AdamW as optimizer
from ..common.train import train

train.init_checkpoint = ""  # e.g. convmae_base.pth (pretraining) or a converted detector
train.output_dir = "./output/mask_rcnn_convvitdet_b_25ep"
train.max_iter = 92187
train.amp.enabled = True
train.ddp.fp16_compression = True
train.checkpointer = dict(period=3688, max_to_keep=10)
train.eval_period = 3688

dataloader.train.total_batch_size = 32

optimizer.lr = 8e-5
optimizer.weight_decay = 0.1

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=0.005,  # 461 iterations
    warmup_factor=0.001,
)
