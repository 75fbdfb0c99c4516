#!/usr/bin/env python
"""Images/s of ConvMAE vs FastConvMAE pretraining steps (forward + backward + AdamW).

    python tools/benchmark_pretrain.py --size toy --batch-size 16            # CPU, seconds
    python tools/benchmark_pretrain.py --size b --batch-size 8 --threads 1   # CPU, Base at 224
    python tools/benchmark_pretrain.py --size b --batch-size 64 --device cuda --amp bfloat16

A FastConvMAE step on B images does the work of 4 masked views; it costs less than 4 ConvMAE
steps on B images because stages 1-2 run once. The table prints both and that ratio.
"""

import argparse
import json

import torch

import convmae_det  # noqa: F401
from convmae_det.engine.pretrain_benchmark import benchmark_pretrain_step
from convmae_det.modeling.pretrain import build_pretrain_model


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", choices=["toy", "b"], default="toy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=None, help="default 64 (toy) / 224 (b)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "float16", "bfloat16"], default="none")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    img_size = args.img_size or (64 if args.size == "toy" else 224)
    amp = None if args.amp == "none" else getattr(torch, args.amp)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {}
    for kind in ("convmae", "fastconvmae"):
        torch.manual_seed(0)
        model = build_pretrain_model(f"{kind}_{args.size}", img_size=img_size)
        results[kind] = benchmark_pretrain_step(
            model,
            batch_size=args.batch_size,
            img_size=img_size,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            amp_dtype=amp,
        )
        del model
    ratio = results["fastconvmae"]["s_per_step"] / results["convmae"]["s_per_step"]
    print(f"device: {device_name}  threads: {torch.get_num_threads()}  amp: {args.amp}")
    print(f"{'model':<14}{'img/s':>10}{'s/step':>10}{'GFLOP/img':>12}{'TFLOP/s':>10}{'mem GB':>8}")
    for kind, r in results.items():
        mem = f"{r['peak_mem_gb']:8.2f}" if "peak_mem_gb" in r else f"{'-':>8}"
        print(
            f"{kind:<14}{r['img_per_s']:10.2f}{r['s_per_step']:10.3f}"
            f"{r['gflops_per_img']:12.2f}{r['tflops_per_s']:10.3f}{mem}"
        )
    print(
        f"FastConvMAE step / ConvMAE step = {ratio:.2f} (4 masked views for the price of {ratio:.2f})"
    )
    results["fast_over_convmae_step_time"] = ratio
    results["device"] = device_name
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
