"""FastConvMAE + Mixture of Reconstructors on the toy images: the recipe of
fastconvmae_b_mor_50ep.py (pixels + EMA encoder, optional frozen teachers) with the toy encoder,
64x64 crops and the toy schedule of fastconvmae_toy.py; a CPU demo in minutes.

    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_mor_toy.py

Frozen teachers are timm models read from local files (never downloaded): a DINO-style and a
CLIP-style ViT saved with ``torch.save(vit.state_dict(), path)`` (tiny ones with random weights
are enough to try the pipeline), or the published DINO / CLIP checkpoints. One override, on one
line (hydra's grammar has no line breaks)::

    TINY='model_kwargs: {embed_dim: 32, depth: 1, num_heads: 2, img_size: 64}'
    DINO="{name: dino, arch: vit_small_patch8_224.dino, checkpoint: dino.pth, $TINY}"
    CLIP="{name: clip, arch: vit_base_patch16_clip_224.openai, checkpoint: clip.pth, $TINY}"
    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_mor_toy.py \\
        "model.mor.teachers=[$DINO, $CLIP]"

``model_kwargs`` are ``timm.create_model`` arguments and must match the file (leave them out for
the published teachers); ``weight: 0.5`` in a teacher's dict weighs its loss term. The toy decoder
has 2 blocks: 1 shared, 1 per target (Base: 6 + 2). Checkpoints carry the reconstructor heads and
the EMA encoder under ``mor.*``; the official keys are those of fastconvmae_toy.py, so the toy
detectors load them as usual.
"""

from .fastconvmae_b_mor_50ep import model as _base_mor
from .fastconvmae_toy import model, train

model.mor = _base_mor.mor
model.mor.head_depth = 1  # of the toy decoder's 2 blocks

train.output_dir = "output/pretrain/fastconvmae_mor_toy"
