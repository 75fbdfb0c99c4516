# ConvViT-B classifier of the official ConvMAE fine-tuning (models_convvit.convvit_base_patch16
# with global_pool=True): stages 1-3, mean over the stage-3 tokens, fc_norm (LayerNorm eps 1e-6),
# linear head; 85.37 M parameters for 1000 classes. Training: mixup 0.8 / cutmix 1.0 with label
# smoothing 0.1 and the soft-target cross entropy, as main_finetune.py.
from detectron2.config import LazyCall as L
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from convmae_det.modeling.classifier import ConvViTClassifierNet, ImageClassifier

model = L(ImageClassifier)(
    net=L(ConvViTClassifierNet)(
        num_classes=1000,
        drop_path_rate=0.1,
        conv_norm_eps=1e-5,  # patch embeddings and conv blocks: 1e-5; stage-3 blocks: 1e-6
        attn_norm_eps=1e-6,
        pos_embed_hw=(14, 14),  # the 224 grid; another input size resizes it (bicubic)
    ),
    criterion=L(SoftTargetCrossEntropy)(),
    mixup=L(Mixup)(
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=0.1,
        num_classes="${..net.num_classes}",
    ),
)
