# COCO instances with large-scale jitter (LSJ, ViTDet): flip, resize by 0.1-2.0 of 1024,
# crop 1024 (the model pads to a 1024 square), RGB; test: longest side 1024.
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from convmae_det.data.detection_mapper import DetectionDatasetMapper
from convmae_det.data.resumable_loader import build_resumable_train_loader
from convmae_det.engine.detection_eval import CheckedCOCOEvaluator, build_checked_test_loader

image_size = 1024
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
# batch i depends on (seed, i) only: exact resume; skip_bad_samples=True logs and skips bad files
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.seed = -1  # < 0: random, kept in the checkpoint
dataloader.train.skip_bad_samples = False
# DatasetMapper that also maps images without instances (empty gt_masks for recompute_boxes)
dataloader.train.mapper._target_ = DetectionDatasetMapper
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(
        min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size
    ),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.recompute_boxes = True  # boxes from the cropped masks
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]
# test images that cannot be read stop evaluation naming the file (exit code 2);
# skip_bad_samples=True leaves them out of the metrics and reports skipped_test_images
dataloader.test._target_ = build_checked_test_loader
dataloader.test.skip_bad_samples = False
dataloader.test.mapper._target_ = DetectionDatasetMapper
# COCO evaluation of a cleaned ground truth when the json has malformed annotations (named)
dataloader.evaluator._target_ = CheckedCOCOEvaluator
