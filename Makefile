# The two commands of the README: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOOPBACK := deploy/loopback.sh
RECIPE ?= deploy/recipes/diloco.yaml
ARGS ?=
# The whole suite takes about 2 minutes on 2 cores; past this limit it is stuck, and fails instead of waiting.
TEST_LIMIT_S ?= 2400

.PHONY: install run test lint proto bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the pinned CPU build, so nothing pulls a CUDA build later.
	$(PIP) install -q torch==2.13.0 numpy
	$(PIP) install -q -e '.[dev,hf]'
	touch $@

install: $(VENV)/.installed

run: install
	$(LOOPBACK) $(VENV)/bin/lowband run $(RECIPE) $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install lint
	PYTHONUNBUFFERED=1 $(LOOPBACK) timeout -k 30 $(TEST_LIMIT_S) $(PY) -m pytest -q --durations=10 tests

proto: install
	$(PY) -m protocols.wire.generate

bench: install
	$(LOOPBACK) $(PY) -m bench.diloco_vs_ddp
	$(LOOPBACK) $(PY) -m bench.transport
	$(LOOPBACK) $(PY) -m bench.compression
	$(LOOPBACK) $(PY) -m bench.wire_bytes

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
