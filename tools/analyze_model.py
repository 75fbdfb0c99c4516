#!/usr/bin/env python
"""Parameters, FLOPs, activations and structure of the model of a config.

Examples::

    # parameters: total, trainable, per top-level module, and fvcore's table 3 levels deep
    python tools/analyze_model.py --config-file configs/COCO/mask_rcnn_convvitdet_b_25ep.py \\
        --tasks parameter
    # FLOPs over 10 images of the config's test set (weights matter for a detector: the number
    # of detections decides the cost of the mask head)
    python tools/analyze_model.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py \\
        --tasks flop activation --num-inputs 10 train.init_checkpoint=model_final.pth
    # FLOPs of one synthetic input of the config's size (no dataset needed), as JSON too
    python tools/analyze_model.py --config-file configs/ADE20K/upernet_convmae_b_512_160k.yaml \\
        --tasks flop --synthetic --output flops.json
    python tools/analyze_model.py --config-file configs/pretrain/fastconvmae_toy.py \\
        --tasks structure

Flags follow detectron2's ``tools/analyze_model.py`` (``--tasks``, ``-n/--num-inputs``,
``--config-file`` and trailing overrides: ``key=value`` for LazyConfig ``.py`` files, unknown keys
refused; ``KEY VALUE`` for yacs ``.yaml`` files). Detectors and segmenters read their inputs from
the config's test loader (``dataloader.test`` / ``DATASETS.TEST[0]``, batch 1) unless
``--synthetic`` is given; pretraining models always get a synthetic batch of one image. The
synthetic size is ``--size`` or the config's: the backbone's ``square_pad``, the training crop or
the test resize of a detector, ``INPUT.SEM_SEG.CROP_SIZE`` of a segmenter, ``train.img_size`` of a
pretraining model.

FLOPs are counted twice on the same inputs:

* fvcore (``FlopCountAnalysis``, detectron2's convention: one FLOP per multiply-add), with
  fused attention (``scaled_dot_product_attention``, which fvcore does not count) added with the
  formula ``tools/benchmark.py`` uses; this gives the per-module table;
* ``convmae_det.benchmark.count_flops`` (PyTorch's FlopCounterMode with its corrections: two
  FLOPs per multiply-add, like ``tools/benchmark.py`` and MFU figures).

The two agree up to a factor 2 and the element-wise work only fvcore counts (norms, resizes).
A missing config file, a bad override, a missing dataset or weight file is reported in one line
on stderr (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Running by path puts tools/ first on sys.path; make the repository importable without install.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import convmae_det  # noqa: E402,F401  (compatibility fixes)
import convmae_det.data  # noqa: E402,F401  (registers the datasets)
from convmae_det.engine.config import check_datasets_of_config  # noqa: E402
from convmae_det.engine.launcher import USER_ERRORS, exit_on_user_error  # noqa: E402
from convmae_det.model_from_config import build_model_from_config, load_any_config  # noqa: E402

TASKS = ("parameter", "flop", "activation", "structure")
logger = logging.getLogger("convmae_det.analyze_model")


def _size(text: str) -> Tuple[int, int]:
    parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected N or HxW")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    parser.add_argument(
        "--tasks",
        required=True,
        nargs="+",
        metavar="TASK",
        help=f"what to report, one or more of {', '.join(TASKS)} (spaces or commas)",
    )
    parser.add_argument(
        "-n",
        "--num-inputs",
        type=int,
        default=1,
        help="test images to average FLOPs / activations over (data dependent for detectors; "
        "one input with --synthetic; default 1)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="count on random images of the config's size instead of its test set",
    )
    parser.add_argument("--size", type=_size, default=None, help="synthetic size: N or HxW")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--depth", type=int, default=3, help="depth of the fvcore tables")
    parser.add_argument("--output", default=None, metavar="JSON", help="also write the results")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: key=value (LazyConfig) or KEY VALUE (yacs)",
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parsed flags. ``--tasks`` takes task names up to the first override: with detectron2's
    greedy ``--tasks`` the overrides after it (``--tasks flop train.init_checkpoint=W``) were read
    as tasks; here they go to the overrides."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks, rest = [], list(args.tasks)
    while rest and all(t in TASKS for t in rest[0].split(",") if t):
        tasks += [t for t in rest.pop(0).split(",") if t]
    if rest and not ("=" in rest[0] or "." in rest[0]):  # not an override: a wrong task
        choices = ", ".join(repr(t) for t in TASKS)
        parser.error(f"argument --tasks: invalid choice: {rest[0]!r} (choose from {choices})")
    if not tasks:
        parser.error(f"argument --tasks: expected one or more of {', '.join(TASKS)}")
    args.tasks = list(dict.fromkeys(tasks))  # in the given order, once each
    args.opts = rest + list(args.opts)
    return args


# ------------------------------------------------------------------------------------ config
def load_config(path: str, opts: Sequence[str]) -> Tuple[Any, str]:
    """The config at ``path`` with checked overrides and its kind ("lazy" / "yacs"): the
    project's one config loader, as in the trainers, demo, conversion and benchmark."""
    return load_any_config(path, list(opts))


def is_pretraining(cfg: Any, kind: str) -> bool:
    """A pretraining config (``model`` + ``train``, no ``dataloader``): the model takes images."""
    return kind == "lazy" and "dataloader" not in cfg


def weights_path(cfg: Any, kind: str) -> str:
    if kind == "yacs":
        return str(cfg.MODEL.WEIGHTS or "")
    if is_pretraining(cfg, kind):
        return ""  # FLOPs of a pretraining model do not depend on its weights
    return str(cfg.train.get("init_checkpoint", "") or "")


def test_dataset(cfg: Any, kind: str) -> Tuple[str, str]:
    """(name, config key) of the dataset the real inputs come from."""
    if kind == "yacs":
        if not cfg.DATASETS.TEST:
            raise ValueError("DATASETS.TEST is empty: give a test dataset or use --synthetic")
        return str(cfg.DATASETS.TEST[0]), "DATASETS.TEST"
    from omegaconf import OmegaConf

    names = OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None)
    if not names:
        raise ValueError("dataloader.test.dataset.names is not set: use --synthetic")
    name = names if isinstance(names, str) else list(names)[0]
    return str(name), "dataloader.test.dataset.names"


def preflight(args: argparse.Namespace) -> Tuple[Any, str]:
    """Config with checked overrides; with FLOP / activation tasks also the inputs' dataset and
    the weight file. Raises for input the user can fix."""
    if args.num_inputs < 1:
        raise ValueError(f"--num-inputs {args.num_inputs}: expected at least 1")
    cfg, kind = load_config(args.config_file, args.opts)
    counting = bool({"flop", "activation"} & set(args.tasks))
    weights = weights_path(cfg, kind)
    if counting and weights and "://" not in weights and not os.path.isfile(weights):
        key = "MODEL.WEIGHTS" if kind == "yacs" else "train.init_checkpoint"
        unset = 'MODEL.WEIGHTS ""' if kind == "yacs" else "train.init_checkpoint=''"
        raise FileNotFoundError(
            f"{key}={weights!r} does not exist (to count with random weights: {unset}; a "
            "detector's head cost depends on how many detections its weights give)"
        )
    if counting and not args.synthetic and not is_pretraining(cfg, kind):
        try:
            check_datasets_of_config([test_dataset(cfg, kind)], kind)
        except USER_ERRORS as exc:
            message = exc.args[0] if exc.args else str(exc)
            raise ValueError(f"{message} (or count on a synthetic input: --synthetic)") from None
    return cfg, kind


# ------------------------------------------------------------------------------------- model
def resolve_device(name: Optional[str]) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(cfg: Any, kind: str, device: str) -> nn.Module:
    """The config's model on ``device`` (random weights)."""
    return build_model_from_config(cfg, kind, device=device)


def load_weights(model: nn.Module, path: str) -> None:
    """Load ``path`` with the project's checkpointer (any supported format, report logged)."""
    if not path:
        return
    from convmae_det.checkpoint import ConvMAECheckpointer

    ConvMAECheckpointer(model).load(path)


# ------------------------------------------------------------------------------------ inputs
def config_image_size(cfg: Any, kind: str) -> Tuple[int, int]:
    """The (H, W) a synthetic input gets (see the module docstring)."""
    if kind == "yacs":
        crop = int(cfg.INPUT.SEM_SEG.CROP_SIZE)
        return crop, crop
    if is_pretraining(cfg, kind):
        size = int(cfg.train.get("img_size", 224))
        return size, size
    from detectron2.config import instantiate
    from detectron2.data import transforms as T
    from omegaconf import OmegaConf

    pad = OmegaConf.select(cfg, "model.backbone.square_pad", default=0) or 0
    if int(pad) > 0:
        return int(pad), int(pad)
    for split in ("train", "test"):
        augs = OmegaConf.select(cfg, f"dataloader.{split}.mapper.augmentations", default=None)
        for aug in augs or []:
            try:
                aug = instantiate(aug)
            except Exception:
                continue
            if isinstance(aug, T.FixedSizeCrop):
                return int(aug.crop_size[0]), int(aug.crop_size[1])
            if isinstance(aug, T.ResizeShortestEdge):
                short = int(max(aug.short_edge_length))
                return short, short
    return 1024, 1024


def synthetic_input(size: Tuple[int, int], pretraining: bool, device: str) -> Any:
    """One synthetic input: a (1, 3, H, W) image batch for a pretraining model, else a
    detectron2 batch of one uint8 image (``convmae_det.benchmark.synthetic_detection_batch``)."""
    if pretraining:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(1, 3, *size, generator=gen).to(device)
    from convmae_det.benchmark import synthetic_detection_batch

    return synthetic_detection_batch(1, size, with_instances=False, device=device)


def real_inputs(cfg: Any, kind: str):
    """Batches of one mapped test image from the config's test loader."""
    from detectron2.data import build_detection_test_loader

    if kind == "yacs":
        from convmae_det.data.sem_seg_mapper import SemSegDatasetMapper

        mapper = SemSegDatasetMapper(cfg, False)
        return build_detection_test_loader(cfg, cfg.DATASETS.TEST[0], mapper=mapper)
    from detectron2.config import instantiate

    test = cfg.dataloader.test
    if "num_workers" in test:
        test.num_workers = 0
    if "batch_size" in test:
        test.batch_size = 1
    return instantiate(test)


def input_batches(args: argparse.Namespace, cfg: Any, kind: str, device: str):
    """``args.num_inputs`` test images (or the one synthetic input) and a description of where
    they come from."""
    pretraining = is_pretraining(cfg, kind)
    if args.synthetic or pretraining:
        size = args.size or config_image_size(cfg, kind)
        return [synthetic_input(size, pretraining, device)], f"synthetic {size[0]}x{size[1]} input"
    loader = real_inputs(cfg, kind)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.num_inputs:
            break
    name = test_dataset(cfg, kind)[0]
    return batches, f"{len(batches)} image(s) of {name}"


# ------------------------------------------------------------------------------------ counting
def _sdpa_macs(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention``: multiply-adds of Q K^T and of
    the attention times V, from the formula the benchmark counts fused attention with."""
    from fvcore.nn.jit_handles import get_shape

    from convmae_det.benchmark.measure import _cpu_sdpa_flop

    shapes = [list(get_shape(v)) for v in inputs[:3]]
    shapes = [[1] * (4 - len(s)) + s for s in shapes]  # (B, heads, L, d)
    return int(_cpu_sdpa_flop(*shapes)) // 2


def _traced(model: nn.Module, inputs: Any):
    from detectron2.export import TracingAdapter

    return TracingAdapter(model, inputs, allow_non_tensor=True)


def fvcore_flops(model: nn.Module, inputs: Any, quiet: bool):
    """fvcore FlopCountAnalysis of ``model(inputs)`` (detectron2's ignored ops, fused attention
    counted)."""
    from detectron2.utils.analysis import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    if quiet:
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


def fvcore_activations(model: nn.Module, inputs: Any, quiet: bool):
    """fvcore ActivationCountAnalysis of ``model(inputs)``."""
    from detectron2.utils.analysis import _IGNORED_OPS
    from fvcore.nn import ActivationCountAnalysis
    from fvcore.nn.jit_handles import generic_activation_jit

    wrapper = _traced(model, inputs)
    analysis = ActivationCountAnalysis(wrapper, wrapper.flattened_inputs)
    analysis.set_op_handle(**{k: None for k in _IGNORED_OPS})
    # fused attention: its output, like the matmuls it replaces
    analysis.set_op_handle("aten::scaled_dot_product_attention", generic_activation_jit())
    if quiet:
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


def _top_level(by_module: Dict[str, int], model: nn.Module) -> Dict[str, int]:
    """Counts of the model's direct children (fvcore names them ``model.<child>``)."""
    return {name: int(by_module.get(f"model.{name}", 0)) for name, _ in model.named_children()}


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def do_flop(model: nn.Module, batches: List[Any], depth: int) -> Dict[str, Any]:
    """FLOPs per input with fvcore and with the benchmark's counter (see the module docstring)."""
    from fvcore.nn import flop_count_table

    from convmae_det.benchmark import count_flops

    model.eval()
    totals, torch_totals = [], []
    by_op: Counter = Counter()
    by_module: Counter = Counter()
    first = None
    with torch.no_grad():
        for i, batch in enumerate(batches):
            analysis = fvcore_flops(model, batch, quiet=i > 0)
            totals.append(int(analysis.total()))
            by_op.update({k: int(v) for k, v in analysis.by_operator().items()})
            by_module.update(_top_level(analysis.by_module(), model))
            first = first or analysis
            torch_totals.append(count_flops(lambda: model(batch))[0])
    n = len(batches)
    logger.info("fvcore FLOP table of the first input:\n" + flop_count_table(first, depth))
    result = {
        "num_inputs": n,
        "fvcore_total": _mean_std(totals),
        "fvcore_by_operator": {k: v / n for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "fvcore_by_module": {k: v / n for k, v in by_module.items()},
        "benchmark_total": _mean_std(torch_totals),
        "unsupported_ops": {k: int(v) for k, v in first.unsupported_ops().items()},
    }
    print("FLOPs by operator (fvcore, G, mean per input):")
    for op, value in result["fvcore_by_operator"].items():
        print(f"  {op:<28s} {value / 1e9:10.4f}")
    print("FLOPs by top-level module (fvcore, G, mean per input):")
    for name, value in result["fvcore_by_module"].items():
        print(f"  {name:<28s} {value / 1e9:10.4f}")
    f, b = result["fvcore_total"], result["benchmark_total"]
    print(
        f"Total GFLOPs (fvcore, 1 per multiply-add): {f['mean'] / 1e9:.4f} ± {f['std'] / 1e9:.4f} "
        f"over {n} input(s)"
    )
    print(
        f"Total GFLOP (benchmark count_flops, 2 per multiply-add): {b['mean'] / 1e9:.4f} ± "
        f"{b['std'] / 1e9:.4f}"
    )
    return result


def do_activation(model: nn.Module, batches: List[Any]) -> Dict[str, Any]:
    """Activations (output elements of the counted operators) per input, with fvcore."""
    model.eval()
    totals = []
    by_op: Counter = Counter()
    by_module: Counter = Counter()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            analysis = fvcore_activations(model, batch, quiet=i > 0)
            totals.append(int(analysis.total()))
            by_op.update({k: int(v) for k, v in analysis.by_operator().items()})
            by_module.update(_top_level(analysis.by_module(), model))
    n = len(batches)
    result = {
        "num_inputs": n,
        "total": _mean_std(totals),
        "by_operator": {k: v / n for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "by_module": {k: v / n for k, v in by_module.items()},
    }
    print("Activations by operator (M, mean per input):")
    for op, value in result["by_operator"].items():
        print(f"  {op:<28s} {value / 1e6:10.3f}")
    print("Activations by top-level module (M, mean per input):")
    for name, value in result["by_module"].items():
        print(f"  {name:<28s} {value / 1e6:10.3f}")
    t = result["total"]
    print(f"Total activations (M): {t['mean'] / 1e6:.3f} ± {t['std'] / 1e6:.3f} over {n} input(s)")
    return result


def do_parameter(model: nn.Module, depth: int) -> Dict[str, Any]:
    """Total, trainable and per top-level module parameter counts, and fvcore's table."""
    from fvcore.nn import parameter_count_table

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows: Dict[str, Dict[str, int]] = {}
    for name, child in model.named_children():
        params = list(child.parameters())
        if params:
            rows[name] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
    own = list(model.parameters(recurse=False))
    if own:
        rows["(own)"] = {
            "total": sum(p.numel() for p in own),
            "trainable": sum(p.numel() for p in own if p.requires_grad),
        }
    print(f"{'module':<32s} {'parameters':>14s} {'trainable':>14s}")
    for name, row in rows.items():
        print(f"{name:<32s} {row['total']:>14,d} {row['trainable']:>14,d}")
    print(f"{'total':<32s} {total:>14,d} {trainable:>14,d}")
    logger.info("fvcore parameter table:\n" + parameter_count_table(model, max_depth=depth))
    print(f"Total parameters: {total} ({total / 1e6:.3f} M, {trainable / 1e6:.3f} M trainable)")
    return {"total": total, "trainable": trainable, "by_module": rows}


def do_structure(model: nn.Module) -> Dict[str, Any]:
    print("Model structure:\n" + str(model))
    return {"type": type(model).__name__}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="convmae_det")
    cfg, kind = exit_on_user_error(lambda: preflight(args))
    device = resolve_device(args.device)
    model = build_model(cfg, kind, device)
    results: Dict[str, Any] = {"config_file": args.config_file, "device": device}
    tasks = args.tasks
    if "parameter" in tasks:
        results["parameters"] = do_parameter(model, args.depth)
    if "structure" in tasks:
        results["structure"] = do_structure(model)
    if "flop" in tasks or "activation" in tasks:
        load_weights(model, weights_path(cfg, kind))
        batches, source = input_batches(args, cfg, kind, device)
        print(f"Counting on {source}")
        results["inputs"] = source
        if "flop" in tasks:
            results["flops"] = do_flop(model, batches, args.depth)
        if "activation" in tasks:
            results["activations"] = do_activation(model, batches)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"Results written to {args.output}")
    return results


if __name__ == "__main__":
    main()
