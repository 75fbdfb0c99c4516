"""ConvMAE-Base pretraining on ImageNet-1k, 1600 epochs (the official recipe).

    python tools/pretrain.py --config-file configs/pretrain/convmae_b_1600ep.py --num-gpus 8 \
        train.data_path=/path/to/imagenet/train train.accum_iter=3

Batch 3072 = 3 nodes x 8 GPUs x 128 images (official command); lr = 1.5e-4 * 3072 / 256 = 1.8e-3.
With fewer GPUs keep batch_size and raise accum_iter. 1600 ep = 1600 x 417 steps of 3072 images
(1,281,167 images / 3072 per step, last partial step dropped).
"""

from detectron2.config import LazyCall as L

from convmae_det.engine.pretrain_loop import PRETRAIN_DEFAULTS
from convmae_det.modeling.pretrain import build_pretrain_model

model = L(build_pretrain_model)(name="convmae_b", img_size=224, mask_ratio=0.75, norm_pix_loss=True)

train = dict(PRETRAIN_DEFAULTS)
train.update(
    output_dir="output/pretrain/convmae_b_1600ep",
    data_path=None,  # set to an ImageFolder root; None trains on generated toy images
    img_size=224,
    batch_size=3072,
    blr=1.5e-4,
    weight_decay=0.05,
    epochs=1600,
    warmup_epochs=40,
    amp=True,
    amp_dtype="float16",
    num_workers=10,
    checkpoint_period=20,
)
