# Paper ConvMAE detector (ConvViTDet-B): multi-scale ConvViT -> FPN -> Mask R-CNN.
# Stage 3: global attention in blocks3 0, 3, 6, 10 (layers 1, 4, 7, 11), 16x16 windows elsewhere,
# one shared relative-position table for all window blocks and one for all global blocks;
# pos_embed stored for the 64x64 grid of a 1024 input and frozen. Outputs e1..e4 (/4../32),
# e4 = 2x2 max-pool of e3. Heads as in the official code: 2-conv RPN, 4conv1fc box head,
# 4-conv mask head, synchronised BN in the FPN and the heads.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from convmae_det.modeling.det_backbone import PAPER_DET_WINDOW_BLOCKS, ConvViTDet

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model

model.backbone = L(FPN)(
    bottom_up=L(ConvViTDet)(
        embed_dims=(256, 384, 768),
        depths=(2, 2, 11),
        num_heads=12,
        mlp_ratios=(4.0, 4.0, 4.0),
        drop_path_rate=0.1,
        conv_norm_eps=1e-5,
        attn_norm_eps=1e-6,
        patch_norm_eps=1e-5,
        pos_embed_hw=(64, 64),
        pos_embed_trainable=False,
        window_size=16,
        window_block_indexes=list(PAPER_DET_WINDOW_BLOCKS),
        rel_pos="shared",
        rel_pos_hw=(64, 64),
        out_features=["e1", "e2", "e3", "e4"],
        e4_kind="maxpool",
        mask_window_padding=True,
    ),
    in_features=["e1", "e2", "e3", "e4"],
    out_channels=256,
    norm="SyncBN",
    top_block=L(LastLevelMaxPool)(),
    square_pad=1024,  # the official model sees 1024x1024 in training and test
)
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"

model.proposal_generator.head.conv_dims = [-1, -1]  # 2 convs in the RPN head
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.mask_head.conv_dims = [256, 256, 256, 256, 256]  # 4 convs + the deconv's width
# BN over the ROIs of all workers; stats_mode "N" tolerates workers without ROIs.
model.roi_heads.box_head.conv_norm = "naiveSyncBN_N"
model.roi_heads.mask_head.conv_norm = "naiveSyncBN_N"
