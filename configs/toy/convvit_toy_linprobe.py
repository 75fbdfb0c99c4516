# Toy-sized linear probe: ImageNet/convvit_b_linprobe_90ep (frozen encoder, BatchNorm1d without
# affine + linear head, LARS, warm-up + cosine, crop + flip only) with the toy pretraining encoder
# on the toy shapes classification set (5 classes, 64x64).
#   200 it x batch 64 = 12,800 images = 21 toy epochs; warm-up 10/90 = 22 it (under a minute).
from convmae_det.modeling.pretrain import TOY_ENCODER_KWARGS as _TOY_ENCODER

from ..ImageNet.convvit_b_linprobe_90ep import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

net = model.net
for _key, _value in _TOY_ENCODER.items():
    setattr(net, _key, _value)
net.num_classes = 5
net.pos_embed_hw = (4, 4)
dataloader.train.mapper.transform.scale = (0.5, 1.0)  # 8 %-area crops often miss the toy shape

dataloader.train.dataset.names = "toy_imagenet_train"
dataloader.train.mapper.transform.input_size = 64
dataloader.train.total_batch_size = 64
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "toy_imagenet_val"
dataloader.test.mapper.transform.input_size = 64
dataloader.test.batch_size = 32
dataloader.test.num_workers = 0

train.device = "cpu"
train.max_iter = 200
train.eval_period = 0
train.log_period = 20
train.checkpointer = dict(period=200, max_to_keep=2)
train.seed = 0
train.output_dir = "./output/toy/convvit_toy_linprobe"

# LARS steps are relative to the weight norm (trust 0.001 x lr), so the recipe's absolute lr
# is kept rather than scaled down with the toy batch (0.1 x 64 / 256 would barely move the head)
optimizer.lr = 0.1 * 16384 / 256
