# What the two toy classification configs (configs/toy/convvit_toy_*.py) share: the toy
# pretraining encoder (its checkpoint loads), the 5 toy shape classes at 64 px
# (toy_imagenet_train / toy_imagenet_val, generated on first use), CPU settings.
from convmae_det.modeling.pretrain import TOY_ENCODER_KWARGS


def use_toy_classification(model, dataloader, train, *, batch_size: int, max_iter: int) -> None:
    """Shrink an ImageNet classification config (LazyConfig nodes) to the toy task."""
    net = model.net
    for key, value in TOY_ENCODER_KWARGS.items():
        setattr(net, key, value)
    net.num_classes = 5
    net.pos_embed_hw = (4, 4)  # the 64-px grid of the toy pretraining
    train_transform = dataloader.train.mapper.transform
    train_transform.input_size = 64
    train_transform.scale = (0.5, 1.0)  # 8 %-area crops often miss the toy shape
    dataloader.train.dataset.names = "toy_imagenet_train"
    dataloader.train.total_batch_size = batch_size
    dataloader.train.num_workers = 0
    dataloader.test.dataset.names = "toy_imagenet_val"
    dataloader.test.mapper.transform.input_size = 64  # resize 73 (64 / 0.875), centre crop 64
    dataloader.test.batch_size = 32
    dataloader.test.num_workers = 0
    train.device = "cpu"
    train.max_iter = max_iter
    train.eval_period = 0
    train.log_period = 20
    train.checkpointer = dict(period=max_iter, max_to_keep=2)
    train.seed = 0
