"""FastConvMAE on the toy images (tiny encoder, 64x64 crops): a CPU demo in minutes.

    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_toy.py

Toy encoder: convmae_det.modeling.pretrain.TOY_ENCODER_KWARGS (dims 32/64/128, depths 1/1/3, 4 heads).
64 toy images / 16 per step = 4 steps per epoch; lr = 1.6e-2 * 16 / 256 = 1e-3.
"""

from convmae_det.engine.pretrain_demo import TOY_PRETRAIN_SETTINGS as _TOY_SETTINGS

from .fastconvmae_b_50ep import model, train

model.name = "fastconvmae_toy"
model.img_size = 64

train.update(_TOY_SETTINGS, output_dir="output/pretrain/fastconvmae_toy", data_path=None)
# data_path=None: generated toy images
