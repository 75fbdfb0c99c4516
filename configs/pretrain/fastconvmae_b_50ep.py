"""FastConvMAE-Base pretraining on ImageNet-1k, 50 epochs (the official recipe).

    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_b_50ep.py --num-gpus 8 \
        train.data_path=/path/to/imagenet/train

Batch 512 = 1 node x 8 GPUs x 64 images (official command); lr = 6e-4 * 512 / 256 = 1.2e-3.
Every image gives 4 complementary views (25 % visible each). 50 ep = 50 x 2502 steps of 512.
"""

from .convmae_b_1600ep import model, train

model.name = "fastconvmae_b"
model.pop("mask_ratio")  # fixed by the 4 complementary masks (0.75)

train.update(
    output_dir="output/pretrain/fastconvmae_b_50ep",
    batch_size=512,
    blr=6.0e-4,
    epochs=50,
    warmup_epochs=10,
    checkpoint_period=5,
)
