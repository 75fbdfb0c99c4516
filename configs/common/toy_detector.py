# What the two toy detectors (configs/toy/*) share: the toy shapes loader, Mask R-CNN heads at
# 48 channels for the 5 toy classes, AdamW and a short cosine schedule for 2 CPU processes.
#   1500 it x batch 4 = 6,000 images = 7.5 epochs of the 800 toy training images
#   (about 7 minutes on 2 CPU cores; warm-up 5 % = 75 it).
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from .optim import AdamW as optimizer
from .toy_coco_loader import dataloader
from .train import train

train.device = "cpu"
train.max_iter = 1500
train.eval_period = 0
train.log_period = 20
train.checkpointer = dict(period=500, max_to_keep=2)
train.seed = 0

optimizer.lr = 2e-3
optimizer.weight_decay = 0.05

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=0.05,
    warmup_factor=0.001,
)


def use_toy_heads(model, channels: int = 48, num_classes: int = 5) -> None:
    """Shrink the Mask R-CNN heads of ``model`` (a LazyCall config) to the toy task: ``channels``
    pyramid features, one RPN conv, 2fc box head, 5-conv mask head, anchors 8-128 px."""
    model.backbone.out_channels = channels
    model.backbone.square_pad = 0
    rpn = model.proposal_generator
    rpn.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
    rpn.head.in_channels = channels
    rpn.head.conv_dims = [-1]
    rpn.batch_size_per_image = 128
    rpn.pre_nms_topk = (600, 300)
    rpn.post_nms_topk = (300, 100)  # (train, test)
    heads = model.roi_heads
    heads.num_classes = num_classes
    heads.batch_size_per_image = 128
    heads.box_head.input_shape.channels = channels
    heads.box_head.conv_dims = []
    heads.box_head.fc_dims = [256, 256]
    heads.box_predictor.input_shape.channels = 256
    heads.box_predictor.test_topk_per_image = 50
    heads.mask_head.input_shape.channels = channels
    heads.mask_head.conv_dims = [channels] * 5
