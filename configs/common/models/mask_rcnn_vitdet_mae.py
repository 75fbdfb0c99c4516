# ViTDet-B (plain MAE ViT-B): detectron2's ViT -> SimpleFeaturePyramid -> Mask R-CNN, with our
# pyramid class so that the padding constraint is honoured. Global attention in blocks 2, 5, 8, 11.
from detectron2 import model_zoo

from convmae_det.modeling.det_backbone import PaddedSimpleFeaturePyramid

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
model.backbone._target_ = PaddedSimpleFeaturePyramid
