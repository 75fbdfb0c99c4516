# ConvMAE-B ImageNet-1K fine-tuning, the official recipe (ConvMAE FINETUNE.md / main_finetune.py):
# 85.0 top-1 from the 1600-epoch ConvMAE-B checkpoint (84.4 from a 50-epoch FastConvMAE-B).
#   batch 1024 (128 x 8 GPUs), blr 5e-4 -> lr = 5e-4 x 1024 / 256 = 2e-3, AdamW (0.9, 0.999),
#   wd 0.05 (none on 1-D parameters and pos_embed), layer decay 0.65 (patch embeddings,
#   pos_embed, blocks1, blocks2: 0.65^12; blocks3.i: 0.65^(11 - i); fc_norm, head: 1),
#   drop path 0.1, 5 warm-up epochs then half-cycle cosine to min_lr 1e-6, mixup 0.8, cutmix 1.0,
#   label smoothing 0.1, RandAugment m9, random erasing 0.25; eval 256 -> centre crop 224.
# 100 ep = 125,100 it (1,251 it/epoch = 1,281,167 images // 1024, drop_last as the official
# DistributedSampler loop); 5 ep warm-up = 6,255 it.
# bf16 autocast on CUDA (the official fp16 gives NaN losses; the non-finite rule stops the run).
from functools import partial

import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from convmae_det.solver import build_param_groups, get_convvit_lr_decay_rate

from ..common.imagenet_loader import dataloader
from ..common.models.convvit_classifier import model
from ..common.train import train

train.init_checkpoint = ""  # a pretraining checkpoint: ours, official ConvMAE / FastConvMAE, EasyCV
train.output_dir = "./output/convvit_b_finetune_100ep"
train.max_iter = 125100
train.amp.enabled = True
train.amp.precision = "bf16"
train.checkpointer = dict(period=12510, max_to_keep=3)  # every 10 epochs
train.eval_period = 12510
train.log_period = 20

dataloader.train.total_batch_size = 1024

optimizer = L(torch.optim.AdamW)(
    params=L(build_param_groups)(
        # params.model is set to the model before instantiation
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        no_decay_rule="ndim",  # MAE / ConvMAE param_groups_lrd: 1-D parameters and pos_embed
        lr_factor_func=partial(get_convvit_lr_decay_rate, lr_decay_rate=0.65, num_layers=11),
    ),
    lr=5e-4 * 1024 / 256,
    betas=(0.9, 0.999),
    weight_decay=0.05,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=1e-6 / (5e-4 * 1024 / 256)),
    warmup_length=5 / 100,
    warmup_factor=0.0,
    rescale_interval=True,  # cosine over the 95 epochs after the warm-up, as the official
)
