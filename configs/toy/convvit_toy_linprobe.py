# Toy-sized linear probe: ImageNet/convvit_b_linprobe_90ep (frozen encoder, BatchNorm1d without
# affine + linear head, LARS, warm-up + cosine, crop + flip only) with the toy pretraining encoder
# on the toy shapes classification set (5 classes, 64x64).
#   200 it x batch 64 = 12,800 images = 21 toy epochs; warm-up 10/90 = 22 it (under a minute).
from ..ImageNet.convvit_b_linprobe_90ep import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from ..common.toy_classification import use_toy_classification

use_toy_classification(model, dataloader, train, batch_size=64, max_iter=200)
train.output_dir = "./output/toy/convvit_toy_linprobe"

# LARS steps are relative to the weight norm (trust 0.001 x lr), so the recipe's absolute lr
# is kept rather than scaled down with the toy batch (0.1 x 64 / 256 would barely move the head)
optimizer.lr = 0.1 * 16384 / 256
