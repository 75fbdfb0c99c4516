# ViTDet-style ConvMAE detector (Official-ConvMAE-Det): ConvViT e3 -> SimpleFeaturePyramid ->
# Mask R-CNN with the ViTDet heads (LN). Stage 3: global attention in blocks3 1, 4, 7, 10,
# 14x14 windows (grid zero-padded) elsewhere, decomposed rel-pos per block for a 64x64 grid;
# pos_embed 14x14, resized to the grid on every forward; LayerNorm eps 1e-6 in the conv blocks.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from convmae_det.modeling.det_backbone import (
    VITDET_WINDOW_BLOCKS,
    ConvViTDet,
    PaddedSimpleFeaturePyramid,
)

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model  # RGB, LN heads

model.backbone = L(PaddedSimpleFeaturePyramid)(
    net=L(ConvViTDet)(
        embed_dims=(256, 384, 768),
        depths=(2, 2, 11),
        num_heads=12,
        mlp_ratios=(4.0, 4.0, 4.0),
        drop_path_rate=0.1,
        conv_norm_eps=1e-6,
        attn_norm_eps=1e-6,
        patch_norm_eps=1e-5,
        pos_embed_hw=(14, 14),
        pos_embed_trainable=True,
        window_size=14,
        window_block_indexes=list(VITDET_WINDOW_BLOCKS),
        rel_pos="decomposed",
        rel_pos_hw=(64, 64),
        out_features=["e3"],
        out_feature_names=["last_feat"],
        e4_kind="none",
        mask_window_padding=False,
    ),
    in_feature="last_feat",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=1024,
)
