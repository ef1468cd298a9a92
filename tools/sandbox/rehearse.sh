#!/usr/bin/env bash
# The GPU check's bare-machine path, on this CPU: benchmarks/gpu_check.sh runs the --quick
# plan in a virtual environment shaped like the GPU machine's python3 (Python 3.12, torch
# 2.11 and the versions of transformers, huggingface_hub, tokenizers and accelerate read
# there; no datasets, Snakemake or lm-eval), with the carried wheels. What fails here
# would fail there, before any device time is spent.
#
#   bash tools/sandbox/rehearse.sh     # from the repository root; about 5 GB the first time
#
# Needs .venv (`make`, for Snakemake's plan) and Python 3.12 ($PY312, default python3.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-device}
if [ ! -x "$VENV/bin/python" ]; then
    "${PY312:-python3.12}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 \
        huggingface_hub==1.33.0 tokenizers==0.23.2 accelerate==1.15.0 safetensors==0.8.0 \
        peft numpy pandas scipy matplotlib lxml pyarrow xxhash aiohttp jinja2 tqdm psutil pyyaml
fi
if ! ls tools/sandbox/wheels/*.whl >/dev/null 2>&1; then
    .venv/bin/python tools/sandbox/wheels/build.py
fi
plan=$(mktemp --suffix .json)
trap 'rm -f "$plan"' EXIT
PATH="$PWD/.venv/bin:$PATH" python benchmarks/gpu_check.py --quick --plan "$plan"
PYTHON="$VENV/bin/python" CFS_GPU_CHECK_TIMEOUT=${CFS_GPU_CHECK_TIMEOUT:-900} \
    bash benchmarks/gpu_check.sh "$plan"
