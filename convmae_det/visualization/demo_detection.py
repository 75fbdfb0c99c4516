"""The detection part of ``make demo``: train a toy-sized detector on the embedded toy shapes on
the CPU, evaluate it on the held-out split (COCO box / mask AP) and draw a few predictions.

    from convmae_det.visualization.demo_detection import run_detection_demo
    metrics = run_detection_demo("demo_output/detection")   # {"box_AP": ..., "mask_AP": ...}
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from PIL import Image

from .. import data as _data  # noqa: F401  (registers the toy datasets, also in spawned workers)
from ..engine.config import check_datasets, dataset_names_in_config, load_lazy_config
from ..engine.lazy import build_checkpointer, lazy_train
from .overlay import draw_prediction

__all__ = [
    "DEFAULT_DEMO_CONFIG",
    "default_num_processes",
    "demo_main",
    "draw_predictions",
    "run_detection_demo",
]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DEMO_CONFIG = os.path.join(_REPO, "configs", "toy", "mask_rcnn_convvitdet_toy.py")
logger = logging.getLogger(__name__)


@torch.no_grad()
def draw_predictions(
    cfg, weights: str, output_dir: str, *, dataset: str = "toy_coco_val", num_images: int = 4
) -> list:
    """Run the model of ``cfg`` with ``weights`` on the first images of ``dataset`` and save
    ``pred_{i}.png`` (predicted masks, boxes, classes, scores >= 0.5). Returns the file paths."""
    model = instantiate(cfg.model).eval()
    build_checkpointer(model).load(weights)
    meta = MetadataCatalog.get(dataset)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for i, record in enumerate(DatasetCatalog.get(dataset)[:num_images]):
        rgb = np.asarray(Image.open(record["file_name"]).convert("RGB"))
        image = torch.as_tensor(rgb.transpose(2, 0, 1).copy())
        if cfg.model.get("input_format", "BGR") == "BGR":
            image = image.flip(0)
        out = model([{"image": image, "height": rgb.shape[0], "width": rgb.shape[1]}])[0]
        picture = draw_prediction(rgb, out, meta, confidence_threshold=0.5, scale=2)
        path = os.path.join(output_dir, f"pred_{i}.png")
        Image.fromarray(picture).save(path)
        paths.append(path)
    return paths


def _demo_worker(output_dir: str, config_file: str, opts: Sequence[str], threads: int) -> None:
    """One process of the demo: train + evaluate; rank 0 writes ``_train_result.json``."""
    torch.set_num_threads(threads)
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="detectron2")
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="convmae_det")
    cfg = load_lazy_config(config_file, opts)
    timings: Dict[str, float] = {}
    results = lazy_train(cfg, timings=timings)
    if comm.is_main_process():
        with open(os.path.join(output_dir, "_train_result.json"), "w") as f:
            json.dump({"results": results, "timings": timings}, f)


def default_num_processes() -> int:
    """2 CPU processes (gloo) when there are at least 2 cores: small detection ops parallelise
    better across processes than across the threads of one process."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_detection_demo(
    output_dir: str,
    *,
    config_file: str = DEFAULT_DEMO_CONFIG,
    init_checkpoint: str = "",
    overrides: Sequence[str] = (),
    num_processes: Optional[int] = None,
    num_visualizations: int = 4,
) -> Dict[str, Any]:
    """Train the toy detector of ``config_file`` from scratch (or from ``init_checkpoint``, e.g.
    the toy pretraining checkpoint), evaluate it on ``toy_coco_val`` and draw predictions.

    Args:
        num_processes: CPU training processes (default :func:`default_num_processes`); the
            total batch stays ``dataloader.train.total_batch_size``.
    Returns:
        {"box_AP", "mask_AP", "box_AP50", "mask_AP50", "train_seconds", "eval_seconds",
         "iterations", "images_per_second", "num_processes", "output_dir", "visualizations",
         "results"}; AP in percent (COCO AP@[.5:.95]). Also written to
        ``output_dir/demo_metrics.json``.
    """
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    opts = [f"train.output_dir={output_dir}"] + list(overrides)
    if init_checkpoint:
        opts.append(f"train.init_checkpoint={init_checkpoint}")
    cfg = load_lazy_config(config_file, opts)  # validates the overrides before any process
    check_datasets(dataset_names_in_config(cfg))  # generates the toy data once, here
    procs = num_processes or default_num_processes()
    threads = max(1, (os.cpu_count() or 1) // procs)
    result_file = os.path.join(output_dir, "_train_result.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    if procs > 1:
        launch(_demo_worker, procs, dist_url="auto", args=(output_dir, config_file, opts, threads))
    else:
        _demo_worker(output_dir, config_file, opts, threads)
    with open(result_file) as f:
        outcome = json.load(f)
    os.remove(result_file)
    results, timings = outcome["results"], outcome["timings"]

    setup_logger(output_dir, name="detectron2")
    box, segm = results.get("bbox", {}), results.get("segm", {})
    iters = int(cfg.train.max_iter)
    batch = int(cfg.dataloader.train.total_batch_size)
    weights = os.path.join(output_dir, "model_final.pth")
    vis = []
    if num_visualizations > 0 and os.path.isfile(weights):
        name = cfg.dataloader.test.dataset.names
        vis = draw_predictions(
            cfg,
            weights,
            os.path.join(output_dir, "vis"),
            dataset=name,
            num_images=num_visualizations,
        )
    metrics = {
        "box_AP": box.get("AP", float("nan")),
        "mask_AP": segm.get("AP", float("nan")),
        "box_AP50": box.get("AP50", float("nan")),
        "mask_AP50": segm.get("AP50", float("nan")),
        "train_seconds": round(timings["train_seconds"], 1),
        "eval_seconds": round(timings["eval_seconds"], 1),
        "iterations": iters,
        "images_per_second": round(iters * batch / max(timings["train_seconds"], 1e-9), 2),
        "num_processes": procs,
        "output_dir": output_dir,
        "visualizations": vis,
        "results": results,
    }
    with open(os.path.join(output_dir, "demo_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    logging.getLogger("detectron2").info(
        f"Toy detection demo: box AP {metrics['box_AP']:.1f}, mask AP {metrics['mask_AP']:.1f} "
        f"(held-out {cfg.dataloader.test.dataset.names}); training {metrics['train_seconds']} s "
        f"for {iters} iterations on {procs} process(es), evaluation {metrics['eval_seconds']} s"
    )
    return metrics


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line of ``tools/run_demo_detection.py``: parse, run the demo, print a line."""
    import argparse

    parser = argparse.ArgumentParser(description="toy detection demo (CPU)")
    parser.add_argument("--output-dir", default="demo_output/detection")
    parser.add_argument("--config-file", default=DEFAULT_DEMO_CONFIG)
    parser.add_argument("--init-checkpoint", default="")
    parser.add_argument("--num-processes", type=int, default=0, help="0: automatic")
    parser.add_argument("opts", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)
    m = run_detection_demo(
        args.output_dir,
        config_file=args.config_file,
        init_checkpoint=args.init_checkpoint,
        overrides=args.opts,
        num_processes=args.num_processes or None,
    )
    print(
        f"toy detection: box AP {m['box_AP']:.1f}  mask AP {m['mask_AP']:.1f}  "
        f"(AP50 {m['box_AP50']:.1f} / {m['mask_AP50']:.1f}); train {m['train_seconds']} s, "
        f"eval {m['eval_seconds']} s; outputs in {m['output_dir']}"
    )
    return 0
