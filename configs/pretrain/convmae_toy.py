"""ConvMAE on the toy images (tiny encoder, 64x64 crops, mask ratio 0.75): a CPU demo in minutes."""

from convmae_det.engine.pretrain_demo import TOY_PRETRAIN_SETTINGS as _TOY_SETTINGS

from .convmae_b_1600ep import model, train

model.name = "convmae_toy"
model.img_size = 64

train.update(_TOY_SETTINGS, output_dir="output/pretrain/convmae_toy", data_path=None)
# data_path=None: generated toy images
