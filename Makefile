# The two commands of the README: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOOPBACK := deploy/loopback.sh
RECIPE ?= deploy/recipes/diloco.yaml
ARGS ?=
# The whole suite (pytest alone) took 20-21 minutes on this sandbox's 2 idle cores on 2026-12-03, and this
# sandbox's cores have run at about half speed on some days (2026-12-02: the integration tests alone took ~30
# minutes). Past this limit it is stuck, and fails instead of waiting; CI's own limit is 90 minutes.
TEST_LIMIT_S ?= 3600

.PHONY: install run test lint proto bench clean docker-test

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

# Build the image (Dockerfile) and run a small job in it, with no network. Not part of `make test`: it needs a
# Docker daemon and downloads torch. DOCKER_BUILD_ARGS="--build-arg TORCH_INDEX=..." builds the CUDA image.
DOCKER_IMAGE ?= lowband:test
DOCKER_BUILD_ARGS ?=
DOCKER_SMOKE := lowband run diloco --set name=smoke --set cluster.workers=2 --set train.steps=20 \
	--set protocol.inner_steps=10 --set train.eval_every_steps=10 --set data.max_chars=200000 \
	&& test -s runs/smoke/summary.json
docker-test:
	@if ! command -v docker > /dev/null 2>&1; then \
		echo "docker-test: skipped, docker is not installed (nothing built)"; exit 0; fi; \
	if ! docker info > /dev/null 2>&1; then \
		echo "docker-test: skipped, no Docker daemon answers 'docker info' (nothing built)"; exit 0; fi; \
	set -e; \
	docker build $(DOCKER_BUILD_ARGS) -t $(DOCKER_IMAGE) .; \
	docker run --rm --network none --shm-size 1g $(DOCKER_IMAGE) sh -c '$(DOCKER_SMOKE)'; \
	echo "docker-test: $(DOCKER_IMAGE) built and ran a 2-worker DiLoCo job"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
