# make run   : set up .venv, then train the quickstart on 2 processes (~10 s after setup)
# make lint  : ruff check and ruff format --check (CI runs it before make test)
# make test  : set up .venv, then run the test suite (what CI runs)
# make test-cluster : the docker-compose cluster test (needs root or a Docker daemon; not part of make test)
# make docs  : regenerate docs/config.md (config field docstrings) and docs/engines-matrix.md (engine capabilities)
# make test-gpu : the GPU check list (tests_gpu/: NCCL, DeepSpeed ZeRO on CUDA, SyncBatchNorm, CUDA OOM; not part of make test)
PYTHON ?= python3
TORCH ?= 2.14.1
# torchvision must be the release built against TORCH (0.28.0 does not load with the 2.13.0 CPU build).
TORCHVISION ?= 0.29.1
VENV ?= .venv
BIN := $(VENV)/bin
# JIT-compiled extensions (DeepSpeed's CPU comm op, our fused optimizer kernels) are built once and kept here.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/largebatch/torch_extensions

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: setup lint run test test-gpu test-cluster bench docs clean

setup: $(VENV)/.installed

# torch and torchvision are installed first, pinned together, so the project's `torch>=2.4` is already satisfied
# and nothing larger is fetched. `largebatch build` then compiles the kernels runs use (about a minute, once), so CI
# and images start warm.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==$(TORCH)" "torchvision==$(TORCHVISION)"
	$(BIN)/pip install -q -e ".[dev,vision,hf]"
	$(BIN)/largebatch build
	touch $@

run: setup
	NPROC=2 PYTHON=$(BIN)/python launch/torchrun.sh configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

test-gpu: setup
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python -m pytest -q -ra tests_gpu; \
	else echo "make test-gpu: no CUDA device here, nothing to check (run it on a GPU machine)"; fi

# 2-node compose job (2 containers × 2 processes) must equal the same job run natively, bit for bit
test-cluster: setup
	PYTHON=$(BIN)/python docker/test-cluster.sh

bench: setup
	$(BIN)/largebatch bench loop

docs: setup
	$(BIN)/python -m largebatch.config_reference
	$(BIN)/python -m largebatch.engine.matrix

clean:
	rm -rf $(VENV) runs .pytest_cache
