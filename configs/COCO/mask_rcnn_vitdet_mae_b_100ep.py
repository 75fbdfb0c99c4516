# ViTDet-B baseline (MAE ViT-B, 51.6 box / 45.9 mask AP): AdamW lr 1e-4, wd 0.1, layer decay 0.7
# over 12 blocks, batch 64, drop path 0.1, LSJ 1024, step schedule.
# 100 ep = 184375 iters * 64 images/iter / 118000 images/ep
from functools import partial

from convmae_det.solver import get_convvit_lr_decay_rate

from ..common.coco_loader_lsj import dataloader
from ..common.models.mask_rcnn_vitdet_mae import model
from ..common.optim import AdamW as optimizer
from ..common.train import train
from ..common.vitdet_step_schedule import lr_multiplier, max_iter

train.init_checkpoint = ""  # e.g. mae_pretrain_vit_base.pth
train.output_dir = "./output/mask_rcnn_vitdet_mae_b_100ep"
train.max_iter = max_iter
train.amp.enabled = True
train.ddp.fp16_compression = True

dataloader.train.total_batch_size = 64

optimizer.lr = 1e-4
optimizer.weight_decay = 0.1
optimizer.params.lr_factor_func = partial(
    get_convvit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7
)
