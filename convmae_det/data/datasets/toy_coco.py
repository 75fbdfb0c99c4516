"""A small, deterministic COCO-format instance dataset of shapes, and its registration.

Each image has a textured background (smooth noise, stripes, checkerboard or gradient) and
4-12 filled shapes of five classes (circle, triangle, square, star, cross) with random colour,
size (from about 10 px to most of the image), rotation and aspect. Shapes may overlap: later
shapes occlude earlier ones, and the annotations describe the *visible* part (polygons, box and
area), as COCO does. Placements that would hide more than half of a shape, or cut a hole into it,
are re-drawn, so every visible part is a set of simple polygons.

Splits are generated on first use into ``$DETECTRON2_DATASETS/toy_coco`` (default
``datasets/toy_coco``) as ``{split}/*.jpg`` plus ``annotations/instances_{split}.json``; the
content depends only on the split's seed. Registered names (detectron2 ``DatasetCatalog``):

================== ====== ========= ===========================================
name               images seed      use
================== ====== ========= ===========================================
toy_coco_train     800    0         training
toy_coco_val       100    1000003   held-out evaluation (disjoint seed stream)
toy_coco_mini      16     2000003   unit tests (train and evaluate)
================== ====== ========= ===========================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.ops import unary_union

from ..annotation_checks import load_coco_json_checked
from .registration import register_dataset

__all__ = [
    "TOY_CLASSES",
    "TOY_SPLITS",
    "toy_coco_root",
    "generate_toy_split",
    "ensure_toy_split",
    "register_toy_coco",
    "shape_polygon",
    "textured_background",
    "shape_fill",
    "generation_lock",
]

logger = logging.getLogger(__name__)

TOY_CLASSES = ("circle", "triangle", "square", "star", "cross")
TOY_COLORS = [(220, 20, 60), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180)]
# name -> (split folder, number of images, seed)
TOY_SPLITS: Dict[str, Tuple[str, int, int]] = {
    "toy_coco_train": ("train", 800, 0),
    "toy_coco_val": ("val", 100, 1_000_003),
    "toy_coco_mini": ("mini", 16, 2_000_003),
}
_FORMAT_VERSION = 3
_IMAGE_SIZE_RANGE = (160, 224)  # height and width drawn independently, multiples of 8
_RADIUS_RANGE = (6.0, 80.0)  # circumradius in pixels, log-uniform
_MIN_VISIBLE = 0.5


def toy_coco_root() -> str:
    """``$DETECTRON2_DATASETS/toy_coco`` (default ``datasets/toy_coco``), like detectron2 builtins."""
    return os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "toy_coco"
    )


# ------------------------------------------------------------------------------ geometry
def shape_polygon(kind: str, cx: float, cy: float, r: float, theta: float, aspect: float):
    """Vertices (K, 2) of a shape with circumradius ``r`` centred at (cx, cy), rotated by theta."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "triangle":
        t = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "square":
        s = np.sqrt(0.5)
        pts = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    elif kind == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif kind == "cross":
        a = 0.3
        pts = np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
             [-1, a], [-1, -a], [-a, -a]]  # fmt: skip
        )
    else:
        raise ValueError(f"unknown toy shape {kind!r}; expected one of {TOY_CLASSES}")
    pts = pts * np.array([aspect, 1.0 / aspect]) * r
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return pts @ rot.T + np.array([cx, cy])


def _pieces(geom) -> List[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon)]


def _visible_parts(polys: List[Polygon], frame) -> Optional[List]:
    """Visible geometry of every shape (later ones on top), or None if a placement is invalid."""
    out = []
    for i, p in enumerate(polys):
        vis = p.intersection(frame)
        above = [q for q in polys[i + 1 :] if q.intersects(vis)]
        if above:
            vis = vis.difference(unary_union(above))
        pieces = [g for g in _pieces(vis) if g.area >= 4.0]
        area = sum(g.area for g in pieces)
        if area < _MIN_VISIBLE * p.area or any(len(g.interiors) for g in pieces):
            return None
        out.append(pieces)
    return out


# ------------------------------------------------------------------------------ rendering
def textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float image of one of four textures, moderately saturated."""
    base = rng.uniform(60, 200, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # smooth blotches
        coarse = rng.normal(0, 30, size=(6, 6, 3)).astype(np.float32)
        img = np.concatenate(
            [np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.BICUBIC))[..., None]
             for c in range(3)], axis=2)  # fmt: skip
        img = base + img
    elif kind == 1:  # stripes
        phi, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
        wave = np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period)
        img = base + wave[..., None] * rng.uniform(10, 35, size=3)
    elif kind == 2:  # checkerboard
        cell = rng.integers(6, 24)
        check = ((xx // cell + yy // cell) % 2)[..., None]
        img = base + (check - 0.5) * rng.uniform(15, 50, size=3)
    else:  # linear gradient between two colours
        other = rng.uniform(60, 200, size=3)
        phi = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(phi) + yy * np.sin(phi)
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
        img = base * (1 - t) + other * t
    img = img + rng.normal(0, 6, size=(h, w, 3))
    return img.astype(np.float32)


def shape_fill(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) fill texture of one shape: a saturated colour with a soft gradient and noise."""
    hue = rng.uniform(0, 6)
    sector, frac = int(hue), hue - int(hue)
    ramp = [(1, frac, 0), (1 - frac, 1, 0), (0, 1, frac), (0, 1 - frac, 1), (frac, 0, 1),
            (1, 0, 1 - frac)][sector % 6]  # fmt: skip
    value, sat = rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
    color = 255 * value * (1 - sat + sat * np.array(ramp, dtype=np.float32))
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None]
    shade = 1.0 + 0.15 * yy * rng.choice([-1.0, 1.0])
    return color * shade + rng.normal(0, 5, size=(h, w, 3)).astype(np.float32)


def _sample_image(rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[int, List[Polygon]]]]:
    """One image (h, w, 3) uint8 and its visible instances [(class index, polygons)]."""
    h = int(rng.integers(_IMAGE_SIZE_RANGE[0] // 8, _IMAGE_SIZE_RANGE[1] // 8 + 1)) * 8
    w = int(rng.integers(_IMAGE_SIZE_RANGE[0] // 8, _IMAGE_SIZE_RANGE[1] // 8 + 1)) * 8
    frame = box(0, 0, w, h)
    target = int(rng.integers(4, 13))
    classes: List[int] = []
    polys: List[Polygon] = []
    visible = []
    attempts = 0
    while len(polys) < target and attempts < 100:
        attempts += 1
        cls = int(rng.integers(len(TOY_CLASSES)))
        r = float(np.exp(rng.uniform(np.log(_RADIUS_RANGE[0]), np.log(_RADIUS_RANGE[1]))))
        r = min(r, 0.45 * min(h, w))
        cx, cy = rng.uniform(0.3 * r, w - 0.3 * r), rng.uniform(0.3 * r, h - 0.3 * r)
        aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
        pts = shape_polygon(TOY_CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * np.pi), aspect)
        candidate = Polygon(pts)
        parts = _visible_parts(polys + [candidate], frame)
        if parts is None:
            continue
        polys.append(candidate)
        classes.append(cls)
        visible = parts

    img = textured_background(rng, h, w)
    for poly in polys:
        mask_img = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask_img).polygon(
            [tuple(p) for p in np.asarray(poly.exterior.coords)], fill=255
        )
        mask = (np.asarray(mask_img, dtype=np.float32) / 255.0)[..., None]
        img = img * (1 - mask) + shape_fill(rng, h, w) * mask
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return image, list(zip(classes, visible))


# ------------------------------------------------------------------------------ COCO files
def generate_toy_split(root: str, split: str, num_images: int, seed: int) -> str:
    """Write ``root/{split}/*.jpg`` and ``root/annotations/instances_{split}.json``.

    Deterministic: image ``i`` is drawn from ``np.random.default_rng([seed, i])``.
    Files are written into a temporary folder and moved into place, so an interrupted run
    never leaves a half-written split. Returns the json path.
    """
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=root)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        image, instances = _sample_image(rng)
        file_name = f"{split}_{i:06d}.jpg"
        Image.fromarray(image).save(os.path.join(tmp, file_name), quality=92)
        images.append(
            {"id": i + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]}
        )
        for cls, pieces in instances:
            x0 = min(p.bounds[0] for p in pieces)
            y0 = min(p.bounds[1] for p in pieces)
            x1 = max(p.bounds[2] for p in pieces)
            y1 = max(p.bounds[3] for p in pieces)
            segm = [
                [round(float(v), 2) for xy in np.asarray(p.exterior.coords)[:-1] for v in xy]
                for p in pieces
            ]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(float(sum(p.area for p in pieces)), 2),
                    "segmentation": segm,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"convmae_det toy shapes, split {split}, seed {seed}",
                 "version": _FORMAT_VERSION},  # fmt: skip
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(TOY_CLASSES)
        ],
    }
    image_dir = os.path.join(root, split)
    json_file = os.path.join(root, "annotations", f"instances_{split}.json")
    shutil.rmtree(image_dir, ignore_errors=True)
    os.replace(tmp, image_dir)
    with open(json_file + ".tmp", "w") as f:
        json.dump(coco, f)
    os.replace(json_file + ".tmp", json_file)
    return json_file


@contextlib.contextmanager
def generation_lock(root: str):
    """Serialise generation between processes (e.g. the ranks of a distributed run): holds an
    exclusive lock on ``root/.lock`` (created with ``root``) while the body runs."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover (non-POSIX)
            pass
        yield


def _is_current(json_file: str, num_images: int, seed: int) -> bool:
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except (OSError, ValueError):
        return False
    info = coco.get("info", {})
    return (
        info.get("version") == _FORMAT_VERSION
        and f"seed {seed}" in info.get("description", "")
        and len(coco.get("images", [])) == num_images
    )


def ensure_toy_split(name: str, root: Optional[str] = None) -> Tuple[str, str]:
    """Generate the split registered as ``name`` unless it is already on disk.

    Returns:
        (json_file, image_root).
    """
    if name not in TOY_SPLITS:
        raise KeyError(f"unknown toy dataset {name!r}; known: {sorted(TOY_SPLITS)}")
    split, num, seed = TOY_SPLITS[name]
    root = root or toy_coco_root()
    json_file = os.path.join(root, "annotations", f"instances_{split}.json")
    image_root = os.path.join(root, split)
    if not _is_current(json_file, num, seed):
        with generation_lock(root):
            if not _is_current(json_file, num, seed):
                logger.info(f"Generating toy dataset {name} ({num} images) into {root} ...")
                generate_toy_split(root, split, num, seed)
    return json_file, image_root


def _load(name: str) -> List[dict]:
    meta = MetadataCatalog.get(name)
    root = os.path.dirname(os.path.dirname(meta.json_file))
    json_file, image_root = ensure_toy_split(name, root)
    return load_coco_json_checked(json_file, image_root, name)  # names bad annotations


def register_toy_coco(names: Sequence[str] = tuple(TOY_SPLITS), root: Optional[str] = None) -> None:
    """Register the toy splits under ``root`` (default :func:`toy_coco_root`, read now, as
    detectron2's builtins do). Data is generated lazily, by ``DatasetCatalog.get`` or
    :func:`ensure_toy_split`. Registering again with another root replaces the registration."""
    root = os.path.abspath(root or toy_coco_root())
    for name in names:
        split = TOY_SPLITS[name][0]
        json_file = os.path.join(root, "annotations", f"instances_{split}.json")
        register_dataset(
            name,
            lambda name=name: _load(name),
            keep_if=("json_file", json_file),
            json_file=json_file,
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            thing_classes=list(TOY_CLASSES),
            thing_colors=list(TOY_COLORS),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(TOY_CLASSES))},
            generated_on_first_use=True,
        )


register_toy_coco()
