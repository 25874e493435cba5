# Two commands on a fresh machine:  `make demo`  and  `make test`.  Both run `make setup` first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.peftrun-installed
GGUF_STAMP := $(VENV)/.peftrun-gguf-installed
# CPU wheel of torch; on a GPU box install your CUDA torch into .venv first and set TORCH_SPEC= (empty).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint typecheck check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	test -z "$(TORCH_SPEC)" || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# DeepSpeed's ops are JIT-built when used; building none keeps the install CPU-only and quick.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m peftrun demo

# The GGUF tests load exports in llama.cpp itself: llama-cpp-python builds it from source (~9 min on 2 cores,
# once). GGML_NATIVE=OFF: a build for a portable x86-64 baseline, not this machine's CPU, so a cached venv
# still runs on a CI runner of another CPU generation.
$(GGUF_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[gguf]"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q "llama-cpp-python>=0.3.36"
	touch $(GGUF_STAMP)

# Two workers for everything but the Slurm tests, which time a real cluster's signals and run alone.
test: setup $(GGUF_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal tests --ignore=tests/test_slurm.py
	$(BIN)/python -m pytest -q tests/test_slurm.py

lint: setup
	$(BIN)/ruff check peftrun tests benchmarks
	$(BIN)/ruff format --check peftrun tests benchmarks

typecheck: setup
	$(BIN)/mypy
	$(BIN)/mypy tests

check: lint typecheck test

clean:
	rm -rf $(VENV) .peftrun_cache
