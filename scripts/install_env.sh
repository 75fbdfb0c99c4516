#!/usr/bin/env bash
# Creates or reuses $VENV and installs everything convmae_det needs. Idempotent: each step is
# skipped when what it installs is already there. Called by `make install` (and so by test/demo).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
PIP_EXTRA=${PIP_EXTRA:-}
DETECTRON2_SOURCE=${DETECTRON2_SOURCE:-wheel}
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"
# Machines with local package mirrors make pip print one warning per missing mirror folder.
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# shellcheck disable=SC2086
if ! $PY - $TORCH_SPEC <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    have = version(name).split("+")[0]
    if want and have != want:
        sys.exit(1)
PYEOF
then
  echo "[install] $TORCH_SPEC"
  # shellcheck disable=SC2086
  quiet $PIP install -q $PIP_EXTRA $TORCH_SPEC
fi

if ! $PY -c "import timm, fvcore, pycocotools, omegaconf, cv2, shapely, pytest, hypothesis, faster_coco_eval, onnx, onnxruntime, importlinter" 2>/dev/null || [ ! -x "$VENV/bin/lint-imports" ]; then
  echo "[install] detectron2 dependencies (requirements.txt)"
  quiet $PIP install -q -r requirements.txt
fi

quiet $PY scripts/install_detectron2.py --source "$DETECTRON2_SOURCE"

# checked from another folder: in the repository root `import convmae_det` finds the source folder
# even when nothing is installed
PY_ABS="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
SRC="$PWD/convmae_det"
if ! (cd / && "$PY_ABS" -c "import convmae_det, os, sys; sys.exit(0 if os.path.samefile(os.path.dirname(convmae_det.__file__), sys.argv[1]) else 1)" "$SRC") 2>/dev/null; then
  echo "[install] convmae_det (editable)"
  quiet $PIP install -q --no-deps --no-build-isolation -e .
fi
echo "[install] environment ready in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1) in $VENV)"
