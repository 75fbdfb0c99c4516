#!/usr/bin/env bash
# Benchmark suites of docs/PERFORMANCE.md and the check against the performance targets.
#
#   bash tools/perf_suite.sh gpu OUTDIR      # CUDA rows (batch 4, 1024x1024, bf16, ...), about
#                                            # 8 min on an H100/H200, then the targets table
#   bash tools/perf_suite.sh cpu OUTDIR      # CPU rows (one thread), about 25 min on 2 cores
#   bash tools/perf_suite.sh tiny OUTDIR     # the gpu rows with toy models and sizes on the CPU,
#                                            # in one process: checks the plumbing, not speed
#   bash tools/perf_suite.sh prepare [DIR]   # with network: fill wheels/ for an offline GPU machine
#   bash tools/perf_suite.sh install         # offline: install what is missing from wheels/
#
# Every suite first makes sure detectron2 and its dependencies import; where they do not, it
# installs them from wheels/ (made by `prepare`, carried with the working tree), offline, into
# $PERF_SITE (put on PYTHONPATH; torch and the rest of the interpreter are left alone).
# Each row is one `python tools/benchmark.py ...` command (tools/perf_rows.py runs them); OUTDIR
# gets <suite>_<row>.json and .log per row, rows.tsv (outcome of each row), results.md (all
# rows) and targets.md (each target: PASS / FAIL / NOT RUN).
#
# Environment:
#   PYTHON          interpreter (default: the first of python3, python that imports torch)
#   PERF_WHEELS     wheel folder (default: <repo>/wheels)
#   PERF_SITE       install target (default: /tmp/convmae_det_site-py<version>)
#   PERF_BUDGET_S   gpu: seconds for all rows (default 420); rows that do not fit are skipped
#   PERF_COMPILE    1: run the --compile row (default 1 on gpu, 0 on tiny)
#   PERF_LIST       1: only print the suite's rows (NAME LIMIT_S ARGS...), run nothing
set -u
USAGE="usage: perf_suite.sh gpu|cpu|tiny OUTDIR | prepare [WHEEL_DIR] | install"
die_usage() {
  echo "$USAGE" >&2
  [ $# -gt 0 ] && echo "perf_suite.sh: $*" >&2
  exit 2
}
[ $# -ge 1 ] || die_usage "missing the suite"
SUITE=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
WHEELS=${PERF_WHEELS:-$ROOT/wheels}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
    return
  fi
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 \
      && "$cand" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
      PY=$cand
      return
    fi
  done
  PY=python3
}

# detectron2 & co. importable? Else install them from $WHEELS (offline) into $PERF_SITE.
ensure_deps() {
  local ver
  ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || {
    echo "perf_suite.sh: cannot run $PY" >&2
    exit 1
  }
  SITE=${PERF_SITE:-/tmp/convmae_det_site-py$ver}
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if "$PY" scripts/gpu_wheels.py check >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -f "$WHEELS/manifest.json" ]; then
    "$PY" scripts/gpu_wheels.py check >&2
    echo "perf_suite.sh: and no $WHEELS/manifest.json to install them from: run" \
      "'bash tools/perf_suite.sh prepare' on a machine with network and carry wheels/," \
      "or 'make install'" >&2
    exit 1
  fi
  "$PY" scripts/gpu_wheels.py install --wheels "$WHEELS" --target "$SITE" || exit 1
  "$PY" scripts/gpu_wheels.py check || exit 1
}

case "$SUITE" in
  prepare)
    # the tested interpreter (.venv) has pip and network access; any python3 does
    PY=${PYTHON:-}
    [ -z "$PY" ] && { [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python || PY=python3; }
    exec "$PY" scripts/gpu_wheels.py prepare --dest "${2:-$WHEELS}"
    ;;
  install)
    pick_python
    ensure_deps
    echo "[install] ready with: export PYTHONPATH=$PYTHONPATH"
    exit 0
    ;;
  gpu | cpu | tiny) ;;
  *) die_usage "unknown suite '$SUITE'" ;;
esac
[ $# -ge 2 ] && [ -n "$2" ] || die_usage "missing OUTDIR"
OUT=$2
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)

ROWS="$OUT/rows.txt"
: >"$ROWS"
# row NAME LIMIT_S ARGS...: one tools/benchmark.py command (see tools/perf_rows.py)
row() { echo "$*" >>"$ROWS"; }

if [ "$SUITE" = gpu ] || [ "$SUITE" = tiny ]; then
  # The same rows in both; tiny swaps in the toy models, small sizes and 1 + 2 iterations.
  # Order = priority: the rows of the targets first, the --compile row last (the budget skips
  # what does not fit).
  if [ "$SUITE" = gpu ]; then
    DEV="--device cuda"
    B=4 S=1024 DS=1024 SEGB=8 SEGS=512 PTB=64
    BB=convvitdet_b BBV=convmae_vitdet_b REF=vitdet_b PT=fastconvmae_b
    DET=configs/COCO/mask_rcnn_convvitdet_b_25ep.py
    DETV=configs/COCO/mask_rcnn_convmae_vitdet_b_25ep.py
    SEG=configs/ADE20K/upernet_convmae_b_512_160k.yaml
    IT="--warmup 5 --iters 20"   # backbone rows: tens of ms a step
    ITH="--warmup 3 --iters 15"  # detector / pretraining steps
    L=90 LH=150 LC=240           # per-row limits (s): start-up, model build, FLOPs, timing
    BUDGET=${PERF_BUDGET_S:-420}
    COMPILE=${PERF_COMPILE:-1}
    ISOLATE=--isolate
  else
    # --peak-tflops 1: skip measuring the CPU matmul peak (MFU is then meaningless, not missing)
    DEV="--device cpu --threads 1 --peak-tflops 1"
    B=2 S=64 DS=128 SEGB=2 SEGS=64 PTB=2
    BB=toy BBV=toy_vitdet REF=toy_vitdet PT=fastconvmae_toy # REF: detectron2's ViT-B is too big
    DET=configs/toy/mask_rcnn_convvitdet_toy.py
    DETV=configs/toy/mask_rcnn_convmae_vitdet_toy.py
    SEG=configs/ADE20K/upernet_convmae_toy.yaml
    IT="--warmup 1 --iters 2"
    ITH="--warmup 1 --iters 2"
    L=60 LH=60 LC=600
    BUDGET=${PERF_BUDGET_S:-0}
    COMPILE=${PERF_COMPILE:-0}
    ISOLATE=
  fi
  G="$DEV --batch-size $B --size $S --dtype bf16"
  GD="$DEV --batch-size $B --size $DS --dtype bf16"
  # targets: backbone MFU + memory, detector train / inference, pretraining vs official, seg
  row backbone_fast $L --preset $BB --mode backbone_train $G --channels-last $IT
  row backbone_fast_ckpt1 $L --preset $BB --mode backbone_train $G --channels-last --act-checkpoint 1 $IT
  row maskrcnn_train $LH --config-file $DET --mode train $GD --channels-last $ITH
  row maskrcnn_infer $L --config-file $DET --mode inference $DEV --batch-size 1 --size $DS --dtype bf16 --channels-last $IT
  row pretrain_fast $LH --preset $PT --mode pretrain $DEV --batch-size $PTB --dtype bf16 --channels-last $ITH
  # the official settings on our model: explicit attention, fp16 autocast, NCHW
  row pretrain_official $LH --preset $PT --mode pretrain $DEV --batch-size $PTB --dtype fp16 --attn explicit $ITH
  row seg_backbone_train $L --config-file $SEG --mode backbone_train $DEV --batch-size $SEGB --size $SEGS --dtype bf16 --channels-last $IT
  # context: plain path, other layouts, the detectron2 reference, forward, A/B, other detectors
  row backbone_plain $L --preset $BB --mode backbone_train $G --attn explicit $IT
  row backbone_vitdet_style $L --preset $BBV --mode backbone_train $G --channels-last $IT
  row backbone_d2_vitdet_ref $L --preset $REF --mode backbone_train $G $IT
  row backbone_fwd $L --preset $BB --mode backbone $G --channels-last $IT
  row backbone_ab $LH --preset $BB --mode backbone_train $G --channels-last --compare-plain $IT
  row maskrcnn_vitdet_style_train $LH --config-file $DETV --mode train $GD --channels-last $ITH
  row upernet_train $LH --config-file $SEG --mode train $DEV --batch-size $SEGB --size $SEGS --dtype bf16 --channels-last $ITH
  row backbone_fast_compiled $LC --preset $BB --mode backbone_train $G --channels-last --act-checkpoint 1 --compile $IT
  SKIP_COMPILE=
  [ "$COMPILE" = 1 ] || SKIP_COMPILE=--skip-compile
else
  C="--device cpu --threads 1"
  L=3600
  row toy_fwd $L --preset toy --mode backbone $C --iters 20 --warmup 3
  row toy_fwd_explicit $L --preset toy --mode backbone $C --iters 20 --warmup 3 --attn explicit
  row toy_fwdbwd $L --preset toy --mode backbone_train $C --iters 20 --warmup 3
  row toy_fwdbwd_explicit $L --preset toy --mode backbone_train $C --iters 20 --warmup 3 --attn explicit
  row b512_fwd_fp32 $L --preset convvitdet_b --size 512 --mode backbone $C
  row b512_fwd_fp32_explicit $L --preset convvitdet_b --size 512 --mode backbone $C --attn explicit
  row b512_fwd_bf16_fast $L --preset convvitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last
  row b512_fwd_bf16_explicit $L --preset convvitdet_b --size 512 --mode backbone $C --dtype bf16 --attn explicit
  row b512_fwdbwd_fp32 $L --preset convvitdet_b --size 512 --mode backbone_train $C
  row b512_fwdbwd_bf16_fast $L --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --channels-last
  row b512_fwdbwd_bf16_explicit $L --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --attn explicit
  row b512_fwdbwd_bf16_ckpt $L --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --channels-last --act-checkpoint 1,2,3
  row v512_fwd_bf16_fast $L --preset convmae_vitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last
  row v512_fwd_bf16_explicit $L --preset convmae_vitdet_b --size 512 --mode backbone $C --dtype bf16 --attn explicit
  row vitdet_b512_fwd_bf16 $L --preset vitdet_b --size 512 --mode backbone $C --dtype bf16
  row ab_toy_fwd $L --preset toy --mode backbone $C --iters 20 --warmup 3 --channels-last --compare-plain
  row ab_toy_fwdbwd $L --preset toy --mode backbone_train $C --iters 20 --warmup 3 --channels-last --compare-plain
  row ab_b512_fwd_fp32 $L --preset convvitdet_b --size 512 --mode backbone $C --channels-last --compare-plain
  row ab_b512_fwd_bf16 $L --preset convvitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last --compare-plain
  row ab_b512_fwdbwd_bf16 $L --preset convvitdet_b --size 512 --mode backbone_train $C --dtype bf16 --channels-last --compare-plain
  row ab_v512_fwd_bf16 $L --preset convmae_vitdet_b --size 512 --mode backbone $C --dtype bf16 --channels-last --compare-plain
  row b1024_fwd_bf16_fast $L --preset convvitdet_b --size 1024 --mode backbone $C --dtype bf16 --channels-last --iters 3 --warmup 1
  row b1024_fwdbwd_bf16_fast $L --preset convvitdet_b --size 1024 --mode backbone_train $C --dtype bf16 --channels-last --iters 3 --warmup 1
  BUDGET=${PERF_BUDGET_S:-0}
  ISOLATE=--isolate
  SKIP_COMPILE=
fi

if [ "${PERF_LIST:-0}" = 1 ]; then  # print the rows (NAME LIMIT_S ARGS...) and stop
  cat "$ROWS"
  exit 0
fi
pick_python
ensure_deps
"$PY" - "$SUITE" <<'PYEOF' >&2 || exit 1
import sys, torch
import convmae_det.benchmark  # fail here, once, rather than in every row
cuda = torch.cuda.is_available()
print(f"[suite] {sys.argv[1]}: Python {sys.version.split()[0]}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), {torch.cuda.get_device_name(0) if cuda else 'no CUDA device'}")
if sys.argv[1] == "gpu" and not cuda:
    sys.exit("perf_suite.sh: the gpu suite needs a CUDA device; torch sees none")
PYEOF

"$PY" tools/perf_rows.py "$ROWS" --out "$OUT" --prefix "$SUITE" --budget-s "$BUDGET" $ISOLATE $SKIP_COMPILE
rc=$?
echo
cat "$OUT/results.md"
echo
"$PY" tools/perf_targets.py "$OUT" \
  --title "Targets ($SUITE suite, $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - start )) s):" \
  | tee "$OUT/targets.md"
exit $rc
