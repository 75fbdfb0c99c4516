# Toy-sized paper detector: the structure of mask_rcnn_convvitdet_b_25ep (ConvViT with shared
# window/global relative tables, e4 = maxpool(e3), FPN, Mask R-CNN heads) at a few percent of the
# width, trained from scratch (or from the toy pretraining checkpoint) on the toy shapes on a CPU.
# Schedule and heads: configs/common/toy_detector.py (1500 it x batch 4 = 7.5 toy epochs).
from convmae_det.modeling.pretrain import TOY_ENCODER_KWARGS as _TOY_ENCODER

from ..common.models.mask_rcnn_convvitdet import model
from ..common.toy_detector import dataloader, lr_multiplier, optimizer, train, use_toy_heads

bottom_up = model.backbone.bottom_up
for _key, _value in _TOY_ENCODER.items():  # the toy pretraining encoder: its checkpoint loads
    setattr(bottom_up, _key, _value)
bottom_up.drop_path_rate = 0.0
bottom_up.window_size = 4
bottom_up.window_block_indexes = [1]  # global at 0 and 2, like the first and last of the paper
bottom_up.pos_embed_hw = (12, 12)  # the 192-px training grid
bottom_up.rel_pos_hw = (12, 12)
bottom_up.pos_embed_trainable = True  # from scratch: learn it (frozen in the paper recipe)
model.backbone.norm = ""
use_toy_heads(model)
model.roi_heads.box_head.conv_norm = ""
model.roi_heads.mask_head.conv_norm = ""

train.output_dir = "./output/toy/mask_rcnn_convvitdet_toy"
