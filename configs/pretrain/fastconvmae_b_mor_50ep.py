"""FastConvMAE-Base with the Mixture of Reconstructors (pixels + EMA encoder), 50 epochs.

Pixels + EMA need no external file. To add frozen teachers, give local checkpoints, e.g.

    train.data_path=/path/to/imagenet/train \
    'model.mor.teachers=[{name: dino, arch: vit_base_patch16_224.dino, checkpoint: /ckpt/dino_vitb16.pth},
                         {name: clip, arch: vit_base_patch16_clip_224.openai, checkpoint: /ckpt/clip_b16.bin}]'

The last 2 of the 8 decoder blocks are per target; the first 6 are shared.
"""

from .fastconvmae_b_50ep import model, train

model.mor = dict(
    head_depth=2,
    pixel_weight=1.0,
    target_norm=True,
    ema=dict(weight=1.0, momentum=0.996, momentum_end=1.0),
    teachers=[],
)
train.output_dir = "output/pretrain/fastconvmae_b_mor_50ep"
