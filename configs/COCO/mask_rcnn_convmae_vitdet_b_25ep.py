# ViTDet-style recipe (Official-ConvMAE-Det, 53.9 box / 47.6 mask AP): AdamW lr 1e-4, wd 0.1,
# layer decay 0.8 over 11 stage-3 blocks, batch 16, drop path 0.1, LSJ 1024, step schedule.
# 25 ep = 184375 iters * 16 images/iter / 118000 images/ep
from functools import partial

from convmae_det.solver import get_convvit_lr_decay_rate

from ..common.coco_loader_lsj import dataloader
from ..common.models.mask_rcnn_convmae_vitdet import model
from ..common.optim import AdamW as optimizer
from ..common.train import train
from ..common.vitdet_step_schedule import lr_multiplier, max_iter

train.init_checkpoint = ""  # e.g. convmae_base.pth
train.output_dir = "./output/mask_rcnn_convmae_vitdet_b_25ep"
train.max_iter = max_iter
train.amp.enabled = True
train.ddp.fp16_compression = True
train.checkpointer = dict(period=2500, max_to_keep=2)
train.eval_period = 7500

dataloader.train.total_batch_size = 16

optimizer.lr = 1e-4
optimizer.weight_decay = 0.1
optimizer.params.lr_factor_func = partial(
    get_convvit_lr_decay_rate, num_layers=11, lr_decay_rate=0.8
)
