# FastConvMAE-B ImageNet-1K fine-tuning: 84.4 top-1 from the 50-epoch FastConvMAE-B checkpoint
# (paper; EasyCV reproduces 84.4). FastConvMAE fine-tunes with the ConvMAE fine-tuning code and
# recipe, so everything is convvit_b_finetune_100ep: only the starting checkpoint and the output
# folder differ (the pretraining checkpoint's encoder is the same ConvViT-B).
from .convvit_b_finetune_100ep import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = ""  # e.g. output/pretrain/fastconvmae_b_50ep/checkpoint-0049.pth
train.output_dir = "./output/fastconvmae_b_finetune_100ep"
