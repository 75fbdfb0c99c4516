#!/usr/bin/env python
"""Benchmark a ConvViT backbone, detector or pretraining model: ms/img, img/s, peak memory,
FLOPs/img, TFLOP/s and MFU, as a JSON file and a one-line summary.

Examples:
    python tools/benchmark.py --preset toy --mode backbone_train --device cpu
    python tools/benchmark.py --preset convvitdet_b --mode backbone_train --batch-size 4 \\
        --dtype bf16 --channels-last --act-checkpoint 1,2,3 --output out.json
    python tools/benchmark.py --config-file configs/COCO/mask_rcnn_convvitdet_b_25ep.py \\
        --mode train --batch-size 4 --dtype bf16
    python tools/benchmark.py --preset convvitdet_b --size 512 --compare-plain --device cpu
    python tools/benchmark.py --table out/*.json     # markdown table of saved results
    python tools/benchmark.py --coco-eval 2000 --output coco_eval.json
                                         # COCOEvaluator.evaluate(): faster-coco-eval vs detectron2
    python tools/benchmark.py --data all --data-images 60 --profile
                                         # training mappers: images/s per CPU core, decode included
    python tools/benchmark.py --preset convvitdet_b --dtype bf16 --channels-last --device cpu \
        --memory-breakdown sweep         # saved activations per stage / kind, CPU and CUDA path
    python tools/benchmark.py --exported out/det_onnx --mode inference --iters 10 --threads 2
                                         # ms/image of an exported model vs eager PyTorch (CPU)
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import convmae_det  # noqa: E402,F401
from convmae_det.benchmark import (  # noqa: E402
    AB_MARKDOWN_HEADER,
    BACKBONE_PRESETS,
    MARKDOWN_HEADER,
    MODES,
    PRETRAIN_PRESETS,
    BenchmarkConfig,
    BenchmarkSetupError,
    format_summary,
    markdown_ab_row,
    markdown_row,
    run_ab,
    run_benchmark,
)
from convmae_det.benchmark.data_loading import DATA_SUBJECTS  # noqa: E402
from convmae_det.fast_paths import ATTN_CHOICES, DTYPES, FastPaths  # noqa: E402


def _size(text: str):
    parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected N or HxW")
    return tuple(parts)


def _stages(text: str):
    if text in ("", "none"):
        return ()
    return tuple(v if v == "attn" else int(v) for v in text.split(","))


def _write_json(path, result) -> None:
    """``--output``: the result as JSON (nothing without a path)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-file", help="LazyConfig .py or yacs .yaml of a model")
    src.add_argument(
        "--preset",
        choices=sorted(BACKBONE_PRESETS) + list(PRETRAIN_PRESETS),
        help="built-in backbone (or pretraining model, with --mode pretrain)",
    )
    src.add_argument(
        "--table", nargs="+", metavar="JSON", help="print saved results as a markdown table"
    )
    src.add_argument(
        "--data",
        choices=DATA_SUBJECTS + ("all",),
        help="images/s per CPU core of a training mapper (detection LSJ 1024, segmentation 512, "
        "pretraining 224) on synthetic COCO / ADE20K / ImageNet-size inputs",
    )
    src.add_argument(
        "--coco-eval",
        type=int,
        metavar="IMAGES",
        help="time COCOEvaluator.evaluate() (bbox + segm) on a synthetic evaluation of this many "
        "images: faster-coco-eval vs detectron2's pycocotools path (--iters repeats, default 3)",
    )
    src.add_argument(
        "--exported",
        metavar="DIR",
        help="a folder of tools/export_model.py: ms/image of onnxruntime / TorchScript vs the "
        "eager model of its manifest, fp32 on the CPU, interleaved (--iters rounds, default 10; "
        "--size: synthetic image, default the traced size)",
    )
    p.add_argument("--mode", choices=MODES, default=None, help="default backbone_train")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--size", type=_size, default=None, help="N or HxW (default: preset's, 1024)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="autocast dtype (default bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--attn",
        choices=ATTN_CHOICES,
        default="auto",
        help="stage-3 attention kernel; auto: SDPA except CPU training with rel-pos biases",
    )
    p.add_argument("--explicit-attn", action="store_const", const="explicit", dest="attn")
    p.add_argument("--channels-last", action="store_true", help="NHWC convolutions")
    p.add_argument(
        "--act-checkpoint",
        type=_stages,
        default=(),
        help="stages to recompute in backward, e.g. 3 or 1,2,3; 'attn': the stage-3 attention "
        "core (e.g. 2,attn)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--warmup", type=int, default=None, help="default 10 on CUDA, 2 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default 50 on CUDA, 5 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default: measured with a large matmul; 0: no MFU)",
    )
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--num-instances", type=int, default=8, help="synthetic objects per image")
    p.add_argument("--mask-format", choices=("polygon", "bitmask"), default="polygon")
    p.add_argument(
        "--compare-plain",
        action="store_true",
        help="interleaved timing of these paths vs explicit attention, NCHW, "
        "no checkpointing (same dtype unless --plain-dtype)",
    )
    p.add_argument(
        "--plain-dtype",
        choices=sorted(DTYPES),
        default=None,
        help="--compare-plain: the plain path's dtype (e.g. fp32 to time bf16 against fp32)",
    )
    p.add_argument(
        "--memory-breakdown",
        nargs="?",
        const="breakdown",
        choices=("breakdown", "sweep"),
        help="saved activations per stage and tensor kind on the CPU path and the CUDA path "
        "(modes backbone_train / train, --device cpu); 'sweep': also every --act-checkpoint "
        "policy with its extra FLOPs",
    )
    p.add_argument("--data-images", type=int, default=60, help="images per --data subject")
    p.add_argument("--profile", action="store_true", help="--data: print where the time goes")
    p.add_argument("--output", help="write the JSON result here")
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: key=value (LazyConfig) or KEY VALUE (yacs)",
    )
    return p


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    if args.table:
        results = []
        for path in args.table:
            with open(path) as f:
                results.append(json.load(f))
        single = [r for r in results if "fast_paths" in r]
        pairs = [r for r in results if "speedup" in r]
        if single:
            print(MARKDOWN_HEADER)
            print("\n".join(markdown_row(r) for r in single))
        if pairs:
            print(("\n" if single else "") + AB_MARKDOWN_HEADER)
            print("\n".join(markdown_ab_row(r) for r in pairs))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.coco_eval is not None:
        return _coco_eval(args)
    if args.data:
        return _data(args)
    if args.exported:
        return _exported(args)
    args.mode = args.mode or "backbone_train"
    dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    paths = FastPaths(
        attn=args.attn,
        dtype=dtype,
        channels_last=args.channels_last,
        act_checkpoint=args.act_checkpoint,
        compile=args.compile,
    )
    cfg = BenchmarkConfig(
        config_file=args.config_file,
        preset=args.preset,
        opts=list(args.opts),
        mode=args.mode,
        batch_size=args.batch_size,
        image_size=args.size,
        device=args.device,
        paths=paths,
        warmup=args.warmup,
        iters=args.iters,
        peak_tflops=args.peak_tflops,
        count_flops=not args.no_flops,
        num_instances=args.num_instances,
        mask_format=args.mask_format,
    )
    if args.memory_breakdown:
        return _memory(cfg, args)
    if args.compare_plain:
        plain = FastPaths(attn="explicit", dtype=args.plain_dtype or dtype)
        result = run_ab(cfg, plain)
        f, b = result["fast"]["ms_per_img_stats"], result["baseline"]["ms_per_img_stats"]
        print(
            f"{result['name']} {result['mode']} {dtype}: fast {f['median']:.1f} ms/img, "
            f"plain {plain.dtype} {b['median']:.1f} ms/img, speedup {result['speedup']:.2f}x"
            + (
                f" (CPU time {result['cpu_time_speedup']:.2f}x)"
                if result["cpu_time_speedup"] is not None
                else ""
            )
        )
    else:
        result = run_benchmark(cfg)
        print(format_summary(result))
    _write_json(args.output, result)
    return result


def _memory(cfg: BenchmarkConfig, args) -> dict:
    from convmae_det.benchmark.memory import (
        checkpoint_sweep,
        format_breakdown_table,
        format_sweep_table,
        memory_breakdown,
    )

    h, w = cfg.resolved_size
    result = {}
    for path in ("cpu", "cuda"):
        r = memory_breakdown(cfg, path=path)
        result[path] = r
        print(
            f"\n{r['name']} {r['mode']} {h}x{w} bs{cfg.batch_size} {cfg.paths.dtype}, "
            f"{path.upper()} path (attention: {r['attention']}), act_checkpoint "
            f"{','.join(map(str, cfg.paths.act_checkpoint)) or 'none'}: "
            f"{r['bytes_per_img'] / 2**30:.3f} GiB saved per image (GiB per image below)\n"
        )
        print(format_breakdown_table(r))
    if args.memory_breakdown == "sweep":
        result["sweep"] = checkpoint_sweep(cfg)
        print("\n" + format_sweep_table(result["sweep"]))
    _write_json(args.output, result)
    return result


def _data(args) -> dict:
    from convmae_det.benchmark.data_loading import benchmark_data_loading

    if args.data_images < 1:
        raise BenchmarkSetupError(f"--data-images {args.data_images}: expected at least 1")
    subjects = DATA_SUBJECTS if args.data == "all" else (args.data,)
    results = {}
    for subject in subjects:
        r = benchmark_data_loading(subject, num_images=args.data_images, profile=args.profile)
        results[subject] = r
        print(
            f"{subject} mapper: {r['images_per_second_per_core']:.1f} images/s per core "
            f"({r['ms_per_img_median']:.1f} ms/img median, {r['num_images']} images, 1 thread)"
        )
        if args.profile:
            print(r["profile"])
    _write_json(args.output, results)
    return results


def _exported(args) -> dict:
    from convmae_det.deploy import ExportedModelError, synthetic_image
    from convmae_det.deploy.timing import benchmark_exported, report_lines

    if args.mode not in (None, "inference"):
        raise BenchmarkSetupError(f"--exported times inference only, not --mode {args.mode}")
    if not str(args.device).startswith("cpu") and "--device" in sys.argv[1:]:
        raise BenchmarkSetupError(f"--exported runs on the CPU, not --device {args.device}")
    if args.dtype not in (None, "fp32"):
        raise BenchmarkSetupError(f"--exported runs in fp32, not --dtype {args.dtype}")
    if args.opts:
        raise BenchmarkSetupError(
            "--exported takes the config and overrides of its manifest, not "
            f"{' '.join(args.opts)!r}"
        )
    rounds = 10 if args.iters is None else args.iters
    warmup = 2 if args.warmup is None else args.warmup
    if rounds < 1 or warmup < 0:
        raise BenchmarkSetupError(f"--iters {rounds} / --warmup {warmup}: expected >= 1 / >= 0")
    image = synthetic_image(*args.size) if args.size else None
    try:
        result = benchmark_exported(
            args.exported, image=image, rounds=rounds, warmup=warmup, threads=args.threads
        )
    except ExportedModelError as exc:
        raise BenchmarkSetupError(str(exc)) from None
    print("\n".join(report_lines(result, f"{result['format']} export of {result['config_file']}")))
    _write_json(args.output, result)
    return result


def _coco_eval(args) -> dict:
    from convmae_det.benchmark.coco_eval import benchmark_coco_eval

    if args.coco_eval < 1:
        raise BenchmarkSetupError(f"--coco-eval {args.coco_eval}: expected at least 1 image")
    try:
        result = benchmark_coco_eval(args.coco_eval, repeats=args.iters or 3)
    except RuntimeError as exc:
        raise BenchmarkSetupError(str(exc)) from None
    b = result["backends"]
    print(
        f"COCO evaluate() of {result['num_images']} images, {result['num_detections']} detections"
        f" (bbox + segm, median of {result['repeats']}): detectron2 + pycocotools "
        f"{b['detectron2']['seconds_median']:.2f} s, ours + pycocotools "
        f"{b['pycocotools']['seconds_median']:.2f} s, ours + faster-coco-eval "
        f"{b['faster_coco_eval']['seconds_median']:.2f} s; speedup {result['speedup']:.2f}x, "
        f"largest AP difference {result['largest_ap_difference']:.1e}"
    )
    _write_json(args.output, result)
    return result


if __name__ == "__main__":
    from convmae_det.model_from_config import ConfigError

    try:
        main()
    except ConfigError as exc:  # a bad / refused config file: one line, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except BenchmarkSetupError as exc:
        # settings the tool cannot run with: say which, without a traceback, exit code 2
        print(f"benchmark: {exc}", file=sys.stderr)
        sys.exit(2)
