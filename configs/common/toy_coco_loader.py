# The embedded toy shapes dataset (convmae_det.data.datasets.toy_coco): a scaled-down LSJ at 192
# px for training (flip, resize by 0.6-1.6, crop 192), native size (160-224 px) for test.
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from convmae_det.data.detection_mapper import DetectionDatasetMapper
from convmae_det.data.resumable_loader import build_resumable_train_loader
from convmae_det.engine.detection_eval import CheckedCOCOEvaluator, build_checked_test_loader

image_size = 192
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
# batch i depends on (seed, i) only: exact resume; skip_bad_samples=True logs and skips bad files
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.seed = -1  # < 0: random, kept in the checkpoint
dataloader.train.skip_bad_samples = False
# DatasetMapper that also maps images without instances (empty gt_masks for recompute_boxes)
dataloader.train.mapper._target_ = DetectionDatasetMapper
dataloader.train.dataset.names = "toy_coco_train"
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(
        min_scale=0.6, max_scale=1.6, target_height=image_size, target_width=image_size
    ),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.recompute_boxes = True
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 0

dataloader.test.dataset.names = "toy_coco_val"
dataloader.test.mapper.augmentations = []
dataloader.test.num_workers = 0
# test images that cannot be read stop evaluation naming the file (exit code 2);
# skip_bad_samples=True leaves them out of the metrics and reports skipped_test_images
dataloader.test._target_ = build_checked_test_loader
dataloader.test.skip_bad_samples = False
dataloader.test.mapper._target_ = DetectionDatasetMapper
# COCO evaluation of a cleaned ground truth when the json has malformed annotations (named)
dataloader.evaluator._target_ = CheckedCOCOEvaluator
