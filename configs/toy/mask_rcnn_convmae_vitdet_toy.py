# Toy-sized ViTDet-style detector: the structure of mask_rcnn_convmae_vitdet_b_25ep (ConvViT e3
# with decomposed per-block rel-pos and zero-padded windows, SimpleFeaturePyramid, LN heads) at
# a few percent of the width, trained from scratch on the toy shapes on a CPU.
from functools import partial

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from convmae_det.solver import get_convvit_lr_decay_rate

from ..common.models.mask_rcnn_convmae_vitdet import model
from ..common.optim import AdamW as optimizer
from ..common.toy_coco_loader import dataloader
from ..common.train import train

net = model.backbone.net
net.embed_dims = (32, 64, 128)
net.depths = (1, 1, 3)
net.num_heads = 4
net.drop_path_rate = 0.0
net.window_size = 4
net.window_block_indexes = [0]  # global at 1 and 2 (the last block is global, like the paper)
net.rel_pos_hw = (12, 12)  # the 192-px training grid
model.backbone.out_channels = 48
model.backbone.square_pad = 0

model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
model.proposal_generator.head.in_channels = 48
model.proposal_generator.head.conv_dims = [-1]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (600, 300)
model.proposal_generator.post_nms_topk = (300, 100)  # (train, test)
model.roi_heads.num_classes = 5
model.roi_heads.batch_size_per_image = 128
model.roi_heads.box_head.input_shape.channels = 48
model.roi_heads.box_head.conv_dims = []
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape.channels = 256
model.roi_heads.box_predictor.test_topk_per_image = 50
model.roi_heads.mask_head.input_shape.channels = 48
model.roi_heads.mask_head.conv_dims = [48, 48, 48, 48, 48]

train.output_dir = "./output/toy/mask_rcnn_convmae_vitdet_toy"
train.device = "cpu"
train.max_iter = 1000
train.eval_period = 0
train.log_period = 20
train.checkpointer = dict(period=500, max_to_keep=2)
train.seed = 0

optimizer.lr = 1e-3
optimizer.weight_decay = 0.05
optimizer.params.lr_factor_func = partial(
    get_convvit_lr_decay_rate, num_layers=3, lr_decay_rate=0.9
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=0.05,
    warmup_factor=0.001,
)
