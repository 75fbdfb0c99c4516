"""Pretraining data: an image folder, the MAE augmentation, a (distributed) loader and toy images.

* :class:`ImageFiles`: every image under a root, recursively, so both an ImageFolder layout
  (``root/class/img.jpg``) and a flat folder work; labels are not needed for pretraining.
* :func:`build_pretrain_transform`: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip +
  ImageNet normalisation (torchvision ``transforms.v2``).
* :func:`generate_toy_images`: small synthetic images (random shapes on textures) for CPU demos and
  tests when no real data is at hand.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFiles",
    "build_pretrain_transform",
    "build_pretrain_loader",
    "generate_toy_images",
    "resolve_data_path",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFiles(Dataset):
    """All images under ``root`` (recursively, sorted), returned as ``(transform(img), 0)``."""

    def __init__(self, root: str, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"pretraining data path {root!r} is not a directory")
        files = []
        for base, dirs, names in os.walk(root, followlinks=True):
            dirs.sort()
            files += [os.path.join(base, n) for n in sorted(names)]
        self.files = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.files:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}; expected an "
                "ImageFolder root or a flat folder of images"
            )
        self.root = root
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), 0


def build_pretrain_transform(
    img_size: int,
    crop_scale: Tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """The MAE / ConvMAE pretraining augmentation; returns a (3, size, size) float tensor."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                img_size,
                scale=tuple(crop_scale),
                interpolation=T.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            T.RandomHorizontalFlip(),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def build_pretrain_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Shuffled loader of ``batch_size`` images per process, dropping the last partial batch.

    A dataset smaller than one global batch (toy data) is sampled with replacement so an epoch
    still has one iteration per process.
    """
    global_batch = batch_size * world_size
    if len(dataset) >= global_batch:
        if world_size > 1:
            sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
        else:
            generator = torch.Generator().manual_seed(seed)
            sampler = RandomSampler(dataset, generator=generator)
    else:
        generator = torch.Generator().manual_seed(seed + rank)
        sampler = RandomSampler(
            dataset, replacement=True, num_samples=batch_size, generator=generator
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )


# ------------------------------------------------------------------ toy images
def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour texture: a few oriented sinusoids plus low-frequency noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(3):
        freq = rng.uniform(2, 12)
        angle = rng.uniform(0, np.pi)
        wave = np.sin(
            2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6)
        )
        img += wave[..., None] * rng.uniform(-0.25, 0.25, size=3)
    coarse = rng.uniform(-0.2, 0.2, size=(4, 4, 3)).astype(np.float32)
    img += np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1), np.float32))[:size, :size]
    img += rng.uniform(0.3, 0.7, size=3)
    return np.clip(img, 0, 1)


def generate_toy_images(
    out_dir: str, num_images: int = 64, size: int = 96, seed: int = 0
) -> List[str]:
    """Write ``num_images`` PNGs of random ellipses / rectangles / triangles on textures.

    Existing files with the same names are kept (the function is idempotent). Returns the paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        path = os.path.join(out_dir, f"toy_{i:05d}.png")
        paths.append(path)
        background = _texture(rng, size)
        img = Image.fromarray((background * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = rng.integers(0, size - 8, size=2)
            w, h = rng.integers(8, max(9, size // 2), size=2)
            box = [int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h))]
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.ellipse(box, fill=color)
            elif kind == 1:
                draw.rectangle(box, fill=color)
            else:
                draw.polygon(
                    [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                    fill=color,
                )
        if not os.path.exists(path):
            img.save(path)
    return paths


def resolve_data_path(data_path: Optional[str], output_dir: str) -> str:
    """``data_path``, or a folder of generated toy images under ``output_dir`` when it is None."""
    if data_path:
        return data_path
    toy = os.path.join(output_dir, "toy_images")
    generate_toy_images(toy)
    return toy
