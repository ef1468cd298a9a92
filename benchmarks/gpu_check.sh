#!/usr/bin/env bash
# benchmarks/gpu_check.py --jobs PLAN on a GPU machine that has torch but not cfs's other
# packages and no network, from the repository root:
#
#   python benchmarks/gpu_check.py --plan plan.json    # here, where Snakemake is
#   bash benchmarks/gpu_check.sh plan.json             # there: $OUT/gpu_check.{json,log}
#
# The wheels tools/sandbox/wheels/build.py downloads (git-ignored; carry the folder) are
# unpacked into a temporary folder first on PYTHONPATH, and the stages' packages imported
# once before any stage runs. $PYTHON (default python3) runs it;
# tools/sandbox/rehearse.sh runs it on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
mkdir -p "$OUT"
if ls tools/sandbox/wheels/*.whl >/dev/null 2>&1; then
    "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$SITE" tools/sandbox/wheels/*.whl
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import accelerate, datasets, lm_eval, pandas, peft, torch, transformers' \
    || { echo "gpu_check.sh: a stage's package does not import (make sandbox-wheels?)" >&2; exit 1; }
timeout -k 10 "${CFS_GPU_CHECK_TIMEOUT:-290}" "$PYTHON" benchmarks/gpu_check.py \
    --jobs "$1" --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
