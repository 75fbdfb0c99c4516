#!/usr/bin/env bash
# Run the benchmark rows of docs/PERFORMANCE.md and print them as a markdown table.
#   bash tools/perf_suite.sh gpu OUTDIR     # CUDA rows (batch 4, 1024x1024, bf16)
#   bash tools/perf_suite.sh cpu OUTDIR     # CPU rows (batch 1, one thread)
# Each row is one `python tools/benchmark.py ...` command; rows whose config file is missing are
# skipped with a message.
set -u
SUITE=${1:?usage: perf_suite.sh gpu|cpu OUTDIR}
OUT=${2:?usage: perf_suite.sh gpu|cpu OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

row() {
  local name=$1
  shift
  echo "== $name: $*" >&2
  "$PY" tools/benchmark.py "$@" --output "$OUT/$name.json" 2>"$OUT/$name.log" \
    || echo "   failed, see $OUT/$name.log" >&2
}

config_row() {
  local name=$1 cfg=$2
  shift 2
  if [ -f "$cfg" ]; then row "$name" --config-file "$cfg" "$@"; else echo "== $name: skipped, $cfg not found" >&2; fi
}

if [ "$SUITE" = gpu ]; then
  G="--device cuda --batch-size 4 --size 1024 --dtype bf16"
  row gpu_convvitdet_b_fwdbwd_explicit --preset convvitdet_b --mode backbone_train $G --attn explicit
  row gpu_convvitdet_b_fwdbwd_fast --preset convvitdet_b --mode backbone_train $G --channels-last
  row gpu_convvitdet_b_fwdbwd_fast_ckpt1 --preset convvitdet_b --mode backbone_train $G --channels-last --act-checkpoint 1
  row gpu_convvitdet_b_fwdbwd_fast_compiled --preset convvitdet_b --mode backbone_train $G --channels-last --act-checkpoint 1 --compile
  row gpu_convmae_vitdet_b_fwdbwd_fast --preset convmae_vitdet_b --mode backbone_train $G --channels-last
  row gpu_vitdet_b_fwdbwd --preset vitdet_b --mode backbone_train $G
  row gpu_convvitdet_b_fwd_fast --preset convvitdet_b --mode backbone $G --channels-last
  row gpu_ab_convvitdet_b_fwdbwd --preset convvitdet_b --mode backbone_train $G --channels-last --compare-plain
  config_row gpu_mask_rcnn_convvitdet_b_train configs/COCO/mask_rcnn_convvitdet_b_25ep.py --mode train $G --channels-last --act-checkpoint 1
  config_row gpu_mask_rcnn_convvitdet_b_infer configs/COCO/mask_rcnn_convvitdet_b_25ep.py --mode inference $G --channels-last
  config_row gpu_mask_rcnn_convmae_vitdet_b_train configs/COCO/mask_rcnn_convmae_vitdet_b_25ep.py --mode train $G --channels-last --act-checkpoint 1
  config_row gpu_upernet_convmae_b_train configs/ADE20K/upernet_convmae_b_512_160k.yaml --mode train --device cuda --batch-size 8 --size 512 --dtype bf16 --channels-last
  row gpu_convmae_b_pretrain --preset convmae_b --mode pretrain --device cuda --batch-size 64 --dtype bf16 --channels-last
elif [ "$SUITE" = cpu ]; then
  C="--device cpu --threads 1"
  row cpu_toy_fwd --preset toy --mode backbone $C --iters 20 --warmup 3
  row cpu_toy_fwd_explicit --preset toy --mode backbone $C --iters 20 --warmup 3 --attn explicit
  row cpu_toy_fwdbwd --preset toy --mode backbone_train $C --iters 20 --warmup 3
  row cpu_toy_fwdbwd_explicit --preset toy --mode backbone_train $C --iters 20 --warmup 3 --attn explicit
  row cpu_b512_fwd_fp32 --preset convvitdet_b --size 512 --mode backbone $C
  row cpu_b512_fwd_fp32_explicit --preset convvitdet_b --size 512 --mode backbone $C --attn explicit
  row cpu_b512_fwd_bf16_fast --preset convvitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last
  row cpu_b512_fwd_bf16_explicit --preset convvitdet_b --size 512 --mode backbone $C --dtype bf16 --attn explicit
  row cpu_b512_fwdbwd_fp32 --preset convvitdet_b --size 512 --mode backbone_train $C
  row cpu_b512_fwdbwd_bf16_fast --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --channels-last
  row cpu_b512_fwdbwd_bf16_explicit --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --attn explicit
  row cpu_b512_fwdbwd_bf16_ckpt --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --channels-last --act-checkpoint 1,2,3
  row cpu_v512_fwd_bf16_fast --preset convmae_vitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last
  row cpu_v512_fwd_bf16_explicit --preset convmae_vitdet_b --size 512 --mode backbone $C --dtype bf16 --attn explicit
  row cpu_vitdet_b512_fwd_bf16 --preset vitdet_b --size 512 --mode backbone $C --dtype bf16
  row cpu_ab_toy_fwd --preset toy --mode backbone $C --iters 20 --warmup 3 --channels-last --compare-plain
  row cpu_ab_toy_fwdbwd --preset toy --mode backbone_train $C --iters 20 --warmup 3 --channels-last --compare-plain
  row cpu_ab_b512_fwd_fp32 --preset convvitdet_b --size 512 --mode backbone $C --channels-last --compare-plain
  row cpu_ab_b512_fwd_bf16 --preset convvitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last --compare-plain
  row cpu_ab_b512_fwdbwd_bf16 --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --channels-last --compare-plain
  row cpu_ab_v512_fwd_bf16 --preset convmae_vitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last --compare-plain
  row cpu_b1024_fwd_bf16_fast --preset convvitdet_b --size 1024 --mode backbone $C --dtype bf16 --channels-last --iters 3 --warmup 1
  row cpu_b1024_fwdbwd_bf16_fast --preset convvitdet_b --size 1024 --mode backbone_train $C --dtype bf16 --channels-last --iters 3 --warmup 1
else
  echo "unknown suite $SUITE; expected gpu or cpu" >&2
  exit 2
fi
"$PY" tools/benchmark.py --table "$OUT"/*.json
