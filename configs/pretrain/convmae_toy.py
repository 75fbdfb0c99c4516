"""ConvMAE on the toy images (tiny encoder, 64x64 crops, mask ratio 0.75): a CPU demo in minutes."""

from .convmae_b_1600ep import model, train

model.name = "convmae_toy"
model.img_size = 64

train.update(
    output_dir="output/pretrain/convmae_toy",
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
