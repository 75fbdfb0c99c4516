"""yacs config keys of convmae_det (``add_convmae_config``), for ``tools/plain_train_net.py``.

Defaults reproduce the official ConvMAE-Base UperNet segmenter on ADE20K at 512x512; the config
files under ``configs/ADE20K/`` set the rest (datasets, schedule). Calling
:func:`add_convmae_config` also registers our backbone, heads and meta-architecture, so
``build_model(cfg)`` works right after it.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode as CN

__all__ = ["add_convmae_config"]


def add_convmae_config(cfg: CN) -> CN:
    """Add every convmae_det key to a detectron2 config (in place; also returned)."""
    from .modeling import segmentor, seg_backbone, upernet  # noqa: F401  (registries)

    _c = cfg

    # detectron2 defaults to "cuda"; on a machine without CUDA the model is built on the CPU.
    if _c.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        _c.MODEL.DEVICE = "cpu"

    # ---------------------------------------------------------------- ConvViT segmentation backbone
    _c.MODEL.CONVVIT = CN()
    # Stride of each stage's patch embedding (conv kernel = stride); cumulative 4, 8, 16.
    _c.MODEL.CONVVIT.PATCH_SIZES = [4, 2, 2]
    # Channels of stages 1-3 (ConvMAE-Base: 256, 384, 768).
    _c.MODEL.CONVVIT.EMBED_DIMS = [256, 384, 768]
    # Blocks per stage (Base: 2 conv, 2 conv, 11 transformer).
    _c.MODEL.CONVVIT.DEPTHS = [2, 2, 11]
    # Attention heads of the stage-3 blocks.
    _c.MODEL.CONVVIT.NUM_HEADS = 12
    # MLP expansion ratio per stage.
    _c.MODEL.CONVVIT.MLP_RATIOS = [4.0, 4.0, 4.0]
    # Bias in the qkv projection (True in the official segmenter).
    _c.MODEL.CONVVIT.QKV_BIAS = True
    # Stochastic depth, linearly increasing over all 15 blocks (0.2 in the ADE20K recipe).
    _c.MODEL.CONVVIT.DROP_PATH_RATE = 0.2
    # LayerNorm eps of the conv blocks, the stage-3 blocks and the patch embeddings
    # (the official segmenter uses PyTorch's default 1e-5 everywhere).
    _c.MODEL.CONVVIT.CONV_NORM_EPS = 1e-5
    _c.MODEL.CONVVIT.ATTN_NORM_EPS = 1e-5
    _c.MODEL.CONVVIT.PATCH_NORM_EPS = 1e-5
    # Grid of the stored pos_embed table: the fine-tuning grid (crop / 16, 32x32 at 512). A 14x14
    # pretraining table is resized bicubically at load; other grids are resized on the fly.
    _c.MODEL.CONVVIT.POS_EMBED_HW = [32, 32]
    # Relative positions: "per_block" (a BEiT table in each block, official), "none", "shared",
    # "decomposed".
    _c.MODEL.CONVVIT.REL_POS = "per_block"
    # Grid the relative tables are built for; empty = POS_EMBED_HW.
    _c.MODEL.CONVVIT.REL_POS_HW = []
    # Layer scale gamma_1/gamma_2 init value; 0 disables layer scale.
    _c.MODEL.CONVVIT.LAYER_SCALE_INIT = 1.0
    # Level E4 (stride 32): "conv" (official 3x3 stride-2 conv without padding + norm + GELU) or
    # "maxpool" (2x2 max-pool of E3).
    _c.MODEL.CONVVIT.E4_MODE = "conv"
    # Norm of the E4 conv ("SyncBN" official; becomes the gloo-capable naiveSyncBN on the CPU).
    _c.MODEL.CONVVIT.E4_NORM = "SyncBN"
    # Backbone outputs (strides 4, 8, 16, 32).
    _c.MODEL.CONVVIT.OUT_FEATURES = ["e1", "e2", "e3", "e4"]
    # Attention kernel: False = explicit softmax((q * scale) k^T + bias) v, the official op order
    # (bit-identical stage-3 outputs); True = F.scaled_dot_product_attention (faster, less memory,
    # equal up to float rounding, about 1e-6 relative).
    _c.MODEL.CONVVIT.FUSED_ATTN = False
    # Recompute stage-3 blocks in backward to save memory.
    _c.MODEL.CONVVIT.USE_ACT_CHECKPOINT = False

    # ---------------------------------------------------------------- UperNet decode head
    # (NAME, IN_FEATURES, NUM_CLASSES, IGNORE_VALUE, CONVS_DIM, NORM, LOSS_WEIGHT are detectron2's
    # own MODEL.SEM_SEG_HEAD keys; the config files set them for UperNet.)
    # Output sizes of the pyramid pooling module on the coarsest level.
    _c.MODEL.SEM_SEG_HEAD.POOL_SCALES = [1, 2, 3, 6]
    # Dropout2d before the classifier.
    _c.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1

    # ---------------------------------------------------------------- auxiliary FCN head
    _c.MODEL.AUX_HEAD = CN()
    # Add the auxiliary head's loss in training (it is not used in inference).
    _c.MODEL.AUX_HEAD.ENABLED = True
    # Registered head class (SEM_SEG_HEADS_REGISTRY).
    _c.MODEL.AUX_HEAD.NAME = "FCNHead"
    # Backbone level it reads (E3, stride 16).
    _c.MODEL.AUX_HEAD.IN_FEATURE = "e3"
    # Conv width, number of 3x3 convs, and whether to concatenate the input before the classifier.
    _c.MODEL.AUX_HEAD.CHANNELS = 256
    _c.MODEL.AUX_HEAD.NUM_CONVS = 1
    _c.MODEL.AUX_HEAD.CONCAT_INPUT = False
    # Norm of its convs ("BN", "SyncBN", "GN").
    _c.MODEL.AUX_HEAD.NORM = "SyncBN"
    # Dropout2d before its classifier.
    _c.MODEL.AUX_HEAD.DROPOUT = 0.1
    # Weight of its cross-entropy loss.
    _c.MODEL.AUX_HEAD.LOSS_WEIGHT = 0.4

    # ---------------------------------------------------------------- segmentation inference
    _c.TEST.SEM_SEG = CN()
    # "slide" (windows of CROP_SIZE every STRIDE, overlapping logits averaged) or "whole".
    _c.TEST.SEM_SEG.MODE = "slide"
    # Sliding window (h, w) and step (h, w).
    _c.TEST.SEM_SEG.CROP_SIZE = [512, 512]
    _c.TEST.SEM_SEG.STRIDE = [341, 341]
    # Resize ratios for multi-scale testing ([1.0]: single scale), e.g. [0.5, 0.75, ..., 1.75].
    _c.TEST.SEM_SEG.SCALES = [1.0]
    # Also average the prediction of the horizontally flipped image.
    _c.TEST.SEM_SEG.FLIP = False
    # Test-time resize: shortest edge and the cap on the longest (mmseg scale (2048, 512)).
    _c.TEST.SEM_SEG.MIN_SIZE = 512
    _c.TEST.SEM_SEG.MAX_SIZE = 2048

    # ---------------------------------------------------------------- segmentation training input
    _c.INPUT.SEM_SEG = CN()
    # Base (long, short) scale multiplied by a random ratio in RATIO_RANGE, aspect kept.
    _c.INPUT.SEM_SEG.SCALE = [2048, 512]
    _c.INPUT.SEM_SEG.RATIO_RANGE = [0.5, 2.0]
    # Square random crop; a crop may not be covered more than CAT_MAX_RATIO by one class.
    _c.INPUT.SEM_SEG.CROP_SIZE = 512
    _c.INPUT.SEM_SEG.CAT_MAX_RATIO = 0.75
    # Horizontal flip probability.
    _c.INPUT.SEM_SEG.FLIP_PROB = 0.5
    # mmseg PhotoMetricDistortion (brightness, contrast, saturation, hue).
    _c.INPUT.SEM_SEG.PHOTOMETRIC = True
    # Check every label map for values outside [0, NUM_CLASSES) other than IGNORE_VALUE.
    _c.INPUT.SEM_SEG.CHECK_LABELS = True

    # ---------------------------------------------------------------- solver
    # "AdamW" (layer-wise lr decay, no decay on norms / biases / position tables / layer scale)
    # or "SGD" (detectron2's default optimizer).
    _c.SOLVER.OPTIMIZER = "AdamW"
    _c.SOLVER.BETAS = [0.9, 0.999]
    # Layer-wise lr decay of the backbone (lr * decay ** (12 - layer_id)); 1.0 disables it.
    _c.SOLVER.LAYER_DECAY = 0.75
    # Power of the polynomial schedule used when LR_SCHEDULER_NAME = "WarmupPolyLR".
    _c.SOLVER.POLY_LR_POWER = 1.0
    # Write metrics (console with ETA, metrics.json, tensorboard) every this many iterations.
    _c.SOLVER.LOG_PERIOD = 20
    # Mixed-precision dtype on CUDA ("bfloat16" or "float16"; float16 uses a GradScaler).
    _c.SOLVER.AMP.DTYPE = "bfloat16"
    # Keep only the newest this many periodic checkpoints (model_final.pth is always kept);
    # 0 keeps every one.
    _c.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0
    # A NaN / Inf loss term: "stop" (NonFiniteLossError naming the iteration, the terms and the
    # last good checkpoint) or "skip" (drop that batch's update, log and count it).
    _c.SOLVER.NONFINITE_LOSS = "stop"
    # "skip" mode stops after this many skipped batches.
    _c.SOLVER.NONFINITE_MAX_SKIPS = 10

    # ---------------------------------------------------------------- training data
    # A training image / label that cannot be read or does not match: False raises an error
    # naming the file; True logs it, counts it and replaces it by another image chosen from the
    # seed (the run stays reproducible). Batch i is a function of (SEED, i) in both cases.
    _c.DATALOADER.SKIP_BAD_SAMPLES = False
    return cfg
