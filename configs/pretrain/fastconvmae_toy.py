"""FastConvMAE on the toy images (tiny encoder, 64x64 crops): a CPU demo in minutes.

    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_toy.py

Toy encoder: convmae_det.modeling.pretrain.TOY_ENCODER_KWARGS (dims 32/64/128, depths 1/1/3, 4 heads).
64 toy images / 16 per step = 4 steps per epoch; lr = 1.6e-2 * 16 / 256 = 1e-3.
"""

from .fastconvmae_b_50ep import model, train

model.name = "fastconvmae_toy"
model.img_size = 64

train.update(
    output_dir="output/pretrain/fastconvmae_toy",
    data_path=None,  # generated toy images
    img_size=64,
    batch_size=16,
    blr=1.6e-2,
    epochs=30,
    warmup_epochs=2,
    amp=False,
    num_workers=0,
    log_period=4,
    checkpoint_period=10,
)
