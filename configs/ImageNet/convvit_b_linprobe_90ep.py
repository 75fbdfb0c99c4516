# ConvMAE-B linear probing on ImageNet-1K (MAE's main_linprobe.py, used by ConvMAE): 70.9 top-1.
#   frozen encoder and fc_norm; head = BatchNorm1d(768, affine=False, eps=1e-6) + Linear
#   (trunc-normal std 0.01); LARS (momentum 0.9, trust 0.001; no adaptation of the bias), wd 0,
#   batch 16384, blr 0.1 -> lr = 0.1 x 16384 / 256 = 6.4, 10 warm-up epochs then cosine to 0;
#   RandomResizedCrop 224 + flip only, plain cross entropy; eval 256 -> centre crop 224.
# 90 ep = 7,020 it (78 it/epoch = 1,281,167 images // 16384, drop_last); warm-up 780 it.
# Pooling: mean of the stage-3 tokens + fc_norm (the official default takes token 0 of a model
# without a cls token, i.e. one corner patch; we pool, as its --global_pool does).
import torch.nn as nn
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler
from timm.optim import Lars

from convmae_det.solver import build_param_groups

from ..common.imagenet_loader import dataloader
from ..common.models.convvit_classifier import model
from ..common.train import train

model.net.linear_probe = True
model.net.drop_path_rate = 0.0
model.mixup = None
model.criterion = L(nn.CrossEntropyLoss)()

dataloader.train.mapper.transform.recipe = "linprobe"
dataloader.train.total_batch_size = 16384

train.init_checkpoint = ""  # a pretraining checkpoint
train.output_dir = "./output/convvit_b_linprobe_90ep"
train.max_iter = 7020
train.amp.enabled = True
train.amp.precision = "bf16"
train.checkpointer = dict(period=780, max_to_keep=3)  # every 10 epochs
train.eval_period = 780
train.log_period = 20

optimizer = L(Lars)(
    params=L(build_param_groups)(
        # params.model is set to the model before instantiation; only the head is trainable
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        no_decay_rule="none",
        no_decay_names=(),
        overrides={"bias": {"always_adapt": False}},  # MAE's LARS leaves 1-D parameters as SGD
    ),
    lr=0.1 * 16384 / 256,
    momentum=0.9,
    weight_decay=0.0,
    trust_coeff=0.001,
    always_adapt=True,  # adapt the weight even with wd 0, as MAE's LARS
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=10 / 90,
    warmup_factor=0.0,
    rescale_interval=True,
)
