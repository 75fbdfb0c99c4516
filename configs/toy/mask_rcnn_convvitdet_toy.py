# Toy-sized paper detector: the structure of mask_rcnn_convvitdet_b_25ep (ConvViT with shared
# window/global relative tables, e4 = maxpool(e3), FPN, 2-conv RPN, 4conv1fc box head, 4-conv
# mask head) at a few percent of the width, trained from scratch on the toy shapes on a CPU.
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from ..common.models.mask_rcnn_convvitdet import model
from ..common.optim import AdamW as optimizer
from ..common.toy_coco_loader import dataloader
from ..common.train import train

bottom_up = model.backbone.bottom_up
bottom_up.embed_dims = (32, 64, 128)
bottom_up.depths = (1, 1, 3)
bottom_up.num_heads = 4
bottom_up.drop_path_rate = 0.0
bottom_up.window_size = 4
bottom_up.window_block_indexes = [1]  # global at 0 and 2, like the first and last of the paper
bottom_up.pos_embed_hw = (12, 12)  # the 192-px training grid
bottom_up.rel_pos_hw = (12, 12)
bottom_up.pos_embed_trainable = True  # from scratch: learn it (frozen in the paper recipe)
model.backbone.out_channels = 48
model.backbone.norm = ""
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
model.roi_heads.box_head.conv_norm = ""
model.roi_heads.box_predictor.input_shape.channels = 256
model.roi_heads.box_predictor.test_topk_per_image = 50
model.roi_heads.mask_head.input_shape.channels = 48
model.roi_heads.mask_head.conv_dims = [48, 48, 48, 48, 48]
model.roi_heads.mask_head.conv_norm = ""

train.output_dir = "./output/toy/mask_rcnn_convvitdet_toy"
train.device = "cpu"
train.max_iter = 1000
train.eval_period = 0
train.log_period = 20
train.checkpointer = dict(period=500, max_to_keep=2)
train.seed = 0

optimizer.lr = 1e-3
optimizer.weight_decay = 0.05

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=0.05,
    warmup_factor=0.001,
)
