"""Pretraining data: an image folder, the MAE augmentation, a (distributed) loader and toy images.

* :class:`ImageFiles`: every image under a root, recursively, so both an ImageFolder layout
  (``root/class/img.jpg``) and a flat folder work; labels are not needed for pretraining.
* :func:`build_pretrain_transform`: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip +
  ImageNet normalisation (torchvision ``transforms.v2``).
* :func:`build_pretrain_loader`: a :class:`~convmae_det.data.resumable_loader.ResumableTrainLoader`
  over the files: the batch of global iteration ``i`` (its images and their augmentation) is a
  function of ``(seed, i)`` only, so a run resumed at ``i`` reads what the uninterrupted run read.
* :func:`generate_toy_images`: small synthetic images (random shapes on textures) for CPU demos and
  tests when no real data is at hand.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.v2 as T
from detectron2.utils import comm
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..data.resumable_loader import ResumableTrainLoader

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFiles",
    "build_pretrain_transform",
    "build_pretrain_loader",
    "iters_per_epoch",
    "load_rgb",
    "generate_toy_images",
    "resolve_data_path",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (grey / palette / RGBA converted)."""
    with Image.open(path) as img:
        return img.convert("RGB")


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
        img = load_rgb(self.files[index])
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


class _LoadAndTransform:
    """Mapper of the resumable loader: file path -> ``transform(image)`` (picklable for workers)."""

    def __init__(self, transform: Optional[Callable]):
        self.transform = transform

    def __call__(self, path: str):
        img = load_rgb(path)
        return self.transform(img) if self.transform is not None else img


def iters_per_epoch(num_images: int, global_batch: int) -> int:
    """Iterations of one epoch: the full global batches (the last partial one dropped), at
    least one (a toy dataset smaller than a batch repeats images inside the batch)."""
    return max(num_images // global_batch, 1)


def build_pretrain_loader(
    dataset: ImageFiles,
    *,
    batch_size: int,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    skip_bad_samples: bool = False,
) -> ResumableTrainLoader:
    """Endless loader of ``(batch_size, 3, H, W)`` image batches for this process.

    Sample ``p`` of the stream (``p = i * global_batch + rank * batch_size + j`` for image ``j``
    of this process at global iteration ``i``) is file ``perm[p % N]`` of a permutation seeded
    by ``(seed, p // N)``, augmented with every generator seeded by ``(seed, p)`` (also in the
    worker processes). Every image is read once per ``N`` samples; the images the last partial
    batch of an epoch would drop open the next epoch. ``set_start_iter(i)`` before ``iter()``
    starts at global iteration ``i``; the seed travels in ``state_dict()``. An unreadable image
    raises :class:`~convmae_det.data.resumable_loader.BadSampleError` naming the file, or with
    ``skip_bad_samples`` is logged, counted and replaced by a seed-chosen image.
    """
    files = getattr(dataset, "files", None)
    if files is None:
        raise TypeError(f"build_pretrain_loader expects an ImageFiles dataset, got {dataset!r}")
    return ResumableTrainLoader(
        list(files),
        mapper=_LoadAndTransform(dataset.transform),
        total_batch_size=batch_size * comm.get_world_size(),
        num_workers=num_workers,
        seed=seed,
        collate_fn=torch.stack,
        pin_memory=pin_memory,
        skip_bad_samples=skip_bad_samples,
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
