# Toy-sized ViTDet-style detector: the structure of mask_rcnn_convmae_vitdet_b_25ep (ConvViT e3
# with decomposed per-block rel-pos and zero-padded windows, SimpleFeaturePyramid, LN heads) at
# a few percent of the width, trained from scratch on the toy shapes on a CPU. A structural check:
# it trains, resumes and evaluates, but a single stride-16 map at this size does not learn the toy
# task in this schedule (0.1 box AP; detectron2's own toy-sized ViT + SimpleFeaturePyramid fails
# alike); the paper-style toy (multi-scale FPN) is the one that learns (48 box AP).
# Schedule and heads: configs/common/toy_detector.py (1500 it x batch 4 = 7.5 toy epochs).
from functools import partial

from convmae_det.modeling.pretrain import TOY_ENCODER_KWARGS as _TOY_ENCODER
from convmae_det.solver import get_convvit_lr_decay_rate

from ..common.models.mask_rcnn_convmae_vitdet import model
from ..common.toy_detector import dataloader, lr_multiplier, optimizer, train, use_toy_heads

net = model.backbone.net
for _key, _value in _TOY_ENCODER.items():  # the toy pretraining encoder
    setattr(net, _key, _value)
net.drop_path_rate = 0.0
net.window_size = 4
net.window_block_indexes = [0]  # global at 1 and 2 (the last block is global, like the paper)
net.rel_pos_hw = (12, 12)  # the 192-px training grid
use_toy_heads(model)

train.output_dir = "./output/toy/mask_rcnn_convmae_vitdet_toy"

optimizer.params.lr_factor_func = partial(
    get_convvit_lr_decay_rate, num_layers=3, lr_decay_rate=0.9
)
