#!/usr/bin/env python
"""Draw the training data of a config: the raw annotations of its registered datasets, or what
the training loader feeds the model (after the mapper: augmentations, crops, recomputed boxes).

Examples::

    # toy detector: raw annotations (boxes, polygons, class names) and mapped training batches
    python tools/visualize_data.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py \\
        --source annotation --output-dir vis/annotation --num-images 8
    python tools/visualize_data.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py \\
        --source dataloader --output-dir vis/loader dataloader.train.seed=0
    # semantic segmentation (yacs): label maps drawn over the (cropped, flipped, distorted) images
    python tools/visualize_data.py --config-file configs/ADE20K/upernet_convmae_toy.yaml \\
        --source dataloader --output-dir vis/seg SEED 0

Flags follow detectron2's ``tools/visualize_data.py`` (``--source {annotation,dataloader}``,
``--config-file``, ``--output-dir``, trailing overrides). LazyConfig ``.py`` files take
``key=value`` overrides (unknown keys refused), yacs ``.yaml`` files ``KEY VALUE`` pairs. The
training datasets are ``dataloader.train.dataset.names`` (LazyConfig) or ``DATASETS.TRAIN``
(yacs). One PNG per drawn image is written to ``--output-dir`` (``NNNN_<image name>.png``, at the
size of the drawn image times ``--scale``); a line per image and a summary go to stdout. A missing
config file, a bad override or a missing dataset is reported in one line on stderr (exit code 2).
Loader workers are turned off (drawing is the slow part).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

# Running by path puts tools/ first on sys.path; make the repository importable without install.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import convmae_det  # noqa: E402,F401  (compatibility fixes)
import convmae_det.data  # noqa: E402,F401  (registers the datasets)
from convmae_det.engine.config import (  # noqa: E402
    check_datasets_of_config,
    dataset_names_in_config,
)
from convmae_det.engine.launcher import exit_on_user_error  # noqa: E402
from convmae_det.engine.preflight import check_output_dir  # noqa: E402
from convmae_det.model_from_config import load_any_config  # noqa: E402

SOURCES = ("annotation", "dataloader")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    parser.add_argument(
        "--source",
        choices=SOURCES,
        required=True,
        help="annotation: the dataset's records as registered; dataloader: the mapped training "
        "batches (augmentations applied)",
    )
    parser.add_argument(
        "--output-dir", default="output/visualize_data", help="folder for the PNG files"
    )
    parser.add_argument(
        "--num-images", type=int, default=10, help="images to draw (default 10, at least 1)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="drawing scale (default 1)")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: key=value (LazyConfig) or KEY VALUE (yacs)",
    )
    return parser


# ------------------------------------------------------------------------------------ config
def load_config(path: str, opts: Sequence[str]) -> Tuple[Any, str]:
    """The config at ``path`` with checked overrides and its kind ("lazy" / "yacs"): the
    project's one config loader, as in the trainers, demo, conversion and benchmark."""
    return load_any_config(path, list(opts))


def training_datasets(cfg: Any, kind: str) -> List[Tuple[str, str]]:
    """[(dataset name, config key)] of the training datasets; raises if there are none."""
    if kind == "yacs":
        names = [(str(n), "DATASETS.TRAIN") for n in cfg.DATASETS.TRAIN]
    else:
        names = dataset_names_in_config(cfg)
        names = [(n, k) for n, k in names if k.startswith("dataloader.train")]
    if not names:
        where = "DATASETS.TRAIN" if kind == "yacs" else "dataloader.train.dataset.names"
        pretraining = kind == "lazy" and "dataloader" not in cfg
        hint = "; for pretraining see tools/visualize_pretrain.py" if pretraining else ""
        raise ValueError(
            f"the config names no training dataset ({where} is empty or missing){hint}"
        )
    return names


def preflight(args: argparse.Namespace) -> Tuple[Any, str, List[Tuple[str, str]]]:
    """Config, kind and training datasets, each checked (registered and present; toy datasets
    are generated here). Raises for input the user can fix."""
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: expected at least 1")
    if args.scale <= 0:
        raise ValueError(f"--scale {args.scale}: expected a positive number")
    cfg, kind = load_config(args.config_file, args.opts)
    names = training_datasets(cfg, kind)
    check_datasets_of_config(names, kind)
    return cfg, kind, names


def image_format(cfg: Any, kind: str) -> str:
    """The channel order of the mapped images (``INPUT.FORMAT`` / the mapper's format)."""
    if kind == "yacs":
        return str(cfg.INPUT.FORMAT)
    from omegaconf import OmegaConf

    return str(OmegaConf.select(cfg, "dataloader.train.mapper.image_format", default="BGR"))


def training_batches(cfg: Any, kind: str) -> Iterator[List[Dict[str, Any]]]:
    """The training loader of the config, in this process (no loader workers)."""
    if kind == "yacs":
        from convmae_det.engine.seg_train_loop import build_seg_train_loader

        cfg.DATALOADER.NUM_WORKERS = 0
        loader = build_seg_train_loader(cfg, seed=int(cfg.SEED))
    else:
        from detectron2.config import instantiate

        if "num_workers" in cfg.dataloader.train:
            cfg.dataloader.train.num_workers = 0
        loader = instantiate(cfg.dataloader.train)
    return iter(loader)


# ------------------------------------------------------------------------------------ drawing
def _label_colors(metadata: Any, classes: Sequence[int]) -> Optional[List[np.ndarray]]:
    colors = metadata.get("thing_colors", None)
    if not colors:
        return None
    return [np.asarray(colors[c], dtype=np.float64) / 255.0 for c in classes]


def draw_mapped(record: Dict[str, Any], metadata: Any, fmt: str, scale: float):
    """A mapped training sample: its ``image`` tensor with ``instances`` (boxes, masks,
    keypoints, class names) and / or ``sem_seg`` (labels, ignore value left undrawn).
    Returns (VisImage, description)."""
    from detectron2.data import detection_utils as utils
    from detectron2.utils.visualizer import Visualizer

    img = record["image"].permute(1, 2, 0).cpu().numpy()
    img = utils.convert_image_to_rgb(img, fmt)
    vis = Visualizer(img, metadata=metadata, scale=scale)
    parts = []
    out = vis.output
    if "sem_seg" in record:
        sem_seg = record["sem_seg"].cpu().numpy()
        out = vis.draw_sem_seg(sem_seg, area_threshold=0, alpha=0.5)
        classes = metadata.get("stuff_classes", [])
        shown = [int(v) for v in np.unique(sem_seg) if v < len(classes)]
        parts.append(f"{len(shown)} classes ({', '.join(classes[v] for v in shown)})")
    if "instances" in record:
        inst = record["instances"].to("cpu")
        fields = inst.get_fields()
        names = metadata.get("thing_classes", None)
        classes = fields["gt_classes"].tolist() if "gt_classes" in fields else []
        labels = [names[c] for c in classes] if names else [str(c) for c in classes]
        out = vis.overlay_instances(
            labels=labels or None,
            boxes=fields.get("gt_boxes", None),
            masks=fields.get("gt_masks", None),
            keypoints=fields.get("gt_keypoints", None),
            assigned_colors=_label_colors(metadata, classes),
        )
        parts.append(f"{len(inst)} instances")
    return out, ", ".join(parts) or "no annotations"


def draw_annotation(record: Dict[str, Any], metadata: Any, scale: float):
    """A dataset record as registered (image read from ``file_name``; boxes, polygons / RLE,
    keypoints and ``sem_seg_file_name`` drawn by detectron2's ``draw_dataset_dict``).
    Returns (VisImage, description)."""
    from detectron2.data import detection_utils as utils
    from detectron2.utils.visualizer import Visualizer

    img = utils.read_image(record["file_name"], "RGB")
    vis = Visualizer(img, metadata=metadata, scale=scale)
    out = vis.draw_dataset_dict(record)
    parts = []
    if "annotations" in record:
        parts.append(f"{len(record['annotations'])} instances")
    if "sem_seg_file_name" in record:
        parts.append(f"labels {os.path.basename(record['sem_seg_file_name'])}")
    return out, ", ".join(parts) or "no annotations"


def _records(names: Sequence[Tuple[str, str]]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    from detectron2.data import DatasetCatalog

    for name, _ in names:
        for record in DatasetCatalog.get(name):
            yield name, record


def _samples(cfg: Any, kind: str) -> Iterator[Dict[str, Any]]:
    for batch in training_batches(cfg, kind):
        yield from batch


def _save(vis_image: Any, out_dir: str, index: int, file_name: str) -> str:
    stem = os.path.splitext(os.path.basename(file_name or "image"))[0]
    path = os.path.join(out_dir, f"{index:04d}_{stem}.png")
    vis_image.save(path)
    return path


def visualize(args: argparse.Namespace) -> List[str]:
    """Draw ``args.num_images`` images; returns the written paths."""
    from detectron2.data import MetadataCatalog

    cfg, kind, names = exit_on_user_error(lambda: preflight(args))
    exit_on_user_error(lambda: check_output_dir("--output-dir", args.output_dir))
    metadata = MetadataCatalog.get(names[0][0])
    os.makedirs(args.output_dir, exist_ok=True)
    written: List[str] = []
    if args.source == "annotation":
        for index, (name, record) in enumerate(_records(names)):
            if index >= args.num_images:
                break
            vis, what = draw_annotation(record, MetadataCatalog.get(name), args.scale)
            written.append(_save(vis, args.output_dir, index, record.get("file_name", "")))
            h, w = vis.height, vis.width
            print(f"{written[-1]}: {record.get('file_name', '')} {w}x{h}, {what}")
    else:
        fmt = image_format(cfg, kind)
        samples = _samples(cfg, kind)
        for index in range(args.num_images):
            record = next(samples)
            vis, what = draw_mapped(record, metadata, fmt, args.scale)
            written.append(_save(vis, args.output_dir, index, record.get("file_name", "")))
            h, w = vis.height, vis.width
            print(f"{written[-1]}: {record.get('file_name', '')} mapped to {w}x{h}, {what}")
    datasets = ", ".join(n for n, _ in names)
    print(
        f"visualize_data: wrote {len(written)} images ({args.source} of {datasets}) "
        f"to {args.output_dir}"
    )
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    visualize(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
