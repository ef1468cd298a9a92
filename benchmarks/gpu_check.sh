#!/usr/bin/env bash
# One check of the pipeline on one GPU in one call (benchmarks/gpu_check.py says what it
# measures), from the repository root:
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine: $OUT/gpu_check.{json,log}
#   bash benchmarks/gpu_check.sh --cpu-smoke   # every part on tiny models on CPU
#
# The carried wheels (benchmarks/wheels, git-ignored: built by benchmarks/wheels/build.py)
# are unpacked into a temporary folder put first on PYTHONPATH; nothing is installed into
# the machine's Python. $PYTHON (default python3) runs it; $OUT (default: a temporary
# folder) receives the JSON and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SITE="$TMP/site"
start=$(date +%s)
if ! ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: no wheels in benchmarks/wheels: run python benchmarks/wheels/build.py" \
        "(or make test) on a machine with PyPI, then carry benchmarks/wheels" | tee "$LOG" >&2
    exit 2
fi
# pure-Python wheels: unpacked, they are installed (and faster than pip, which may be absent)
echo "python: $("$PYTHON" --version 2>&1); $(ls benchmarks/wheels/*.whl | wc -l) wheels" >"$LOG"
"$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
    "$SITE" benchmarks/wheels/*.whl >>"$LOG" 2>&1 || echo "unpacking the wheels failed" >>"$LOG"
echo "wheels unpacked into $SITE in $(($(date +%s) - start)) s" >>"$LOG"
export PYTHONPATH="$SITE:$PWD/workflow${PYTHONPATH:+:$PYTHONPATH}"
timeout -k 10 "${CFS_GPU_CHECK_TIMEOUT:-450}" "$PYTHON" benchmarks/gpu_check.py \
    --json "$OUT/gpu_check.json" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "gpu_check.sh: exit $status after $(($(date +%s) - start)) s; $OUT/gpu_check.json" | tee -a "$LOG"
exit "$status"
