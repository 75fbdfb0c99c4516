# ImageNet-1K in the folder layout ($DETECTRON2_DATASETS/imagenet/{train,val}/<class>/*.JPEG,
# datasets/README.md). Training: the official fine-tuning transform (RandomResizedCrop 224,
# flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; timm's create_transform);
# evaluation: resize the shorter side to 256 (bicubic), centre crop 224. Each test image is read
# by exactly one process (detectron2's InferenceSampler), so top-1 / top-5 count every image once.
from detectron2.config import LazyCall as L
from detectron2.data import get_detection_dataset_dicts

from convmae_det.data.classification_mapper import (
    ClassificationMapper,
    build_classification_transform,
)
from convmae_det.data.resumable_loader import build_resumable_train_loader
from convmae_det.engine.detection_eval import build_checked_test_loader
from convmae_det.evaluation.classification import ClassificationEvaluator

dataloader = dict(
    train=L(build_resumable_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="imagenet_train", filter_empty=False),
        mapper=L(ClassificationMapper)(
            transform=L(build_classification_transform)(
                is_training=True,
                input_size=224,
                recipe="finetune",
                auto_augment="rand-m9-mstd0.5-inc1",
                re_prob=0.25,
                re_mode="pixel",
                re_count=1,
            ),
        ),
        total_batch_size=1024,
        num_workers=10,
        seed=-1,  # < 0: follows train.seed; batch i depends on (seed, i) only (exact resume)
        skip_bad_samples=False,  # True: unreadable images are logged, counted and replaced
        drop_invalid_masks=False,
    ),
    test=L(build_checked_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="imagenet_val", filter_empty=False),
        mapper=L(ClassificationMapper)(
            transform=L(build_classification_transform)(is_training=False, input_size=224),
        ),
        batch_size=64,
        num_workers=8,
        skip_bad_samples=False,
    ),
    evaluator=L(ClassificationEvaluator)(dataset_name="${..test.dataset.names}"),
)
