# Toy-sized ImageNet fine-tuning: the structure of ImageNet/convvit_b_finetune_100ep (ConvViT,
# mean pool + fc_norm + head, layer decay, mixup / cutmix, RandAugment, random erasing, warm-up +
# cosine) with the toy pretraining encoder, on the generated toy shapes classification set
# (toy_imagenet: 5 classes, 64x64 images, 600 train / 120 val) on a CPU.
#   1200 it x batch 32 = 38,400 images = 64 toy epochs; warm-up 5 % = 60 it (about 1.5 min on
#   2 cores; 600 it give 43 % top-1, 1200 it 52 %).
# Augmentation is scaled down with the task: RandAugment's rotations and shears paste straight
# grey edges that look like the toy shapes, 8 %-area crops often miss the shape, and strong
# mixup / cutmix keep a short run from learning; here crops of 50-100 % of the image,
# flip, no RandAugment or erasing, mixup 0.2 with label smoothing 0.1.
from functools import partial

from convmae_det.solver import get_convvit_lr_decay_rate

from ..ImageNet.convvit_b_finetune_100ep import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from ..common.toy_classification import use_toy_classification

use_toy_classification(model, dataloader, train, batch_size=32, max_iter=1200)
model.net.drop_path_rate = 0.1
model.mixup.mixup_alpha = 0.2
model.mixup.cutmix_alpha = 0.0
dataloader.train.mapper.transform.auto_augment = None
dataloader.train.mapper.transform.re_prob = 0.0
train.output_dir = "./output/toy/convvit_toy_finetune"

optimizer.lr = 1e-3  # 2e-3 learns more slowly here, 4e-3 not at all
# layer decay over the toy encoder's 3 stage-3 blocks (Base: 11)
optimizer.params.lr_factor_func = partial(
    get_convvit_lr_decay_rate, lr_decay_rate=0.65, num_layers=3
)
