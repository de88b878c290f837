# lowband in a container: `lowband run` (a local Ray inside the container), `lowband coordinator`,
# `lowband worker`, and the node image of the Ray cluster / KubeRay manifests in deploy/ray/.
#
#   CPU (default):  docker build -t lowband:cpu .
#   CUDA:           docker build -t lowband:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The CUDA wheels of torch carry their own CUDA runtime, so the base image stays the same; the host needs an
# NVIDIA driver and the container toolkit (`docker run --gpus all ...`). BASE_IMAGE may name another Python
# 3.11+ image (e.g. one with your site's CA certificates).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Pinned like the Makefile's venv (tests/unit/test_deploy_manifests.py fails if they drift): torch first,
# from the pinned build of the chosen index, so that installing lowband afterwards keeps it and never pulls
# a multi-GB CUDA build into the CPU image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The Ray of every node of a cluster must be the same version; [default] brings the dashboard and job server
# that `ray job submit` and KubeRay's RayJob talk to.
ARG RAY_VERSION=2.60.0
# lowband's extras: hf = Hugging Face models, LoRA/PiSSA, GaLore, DP-SGD. Empty for a smaller image.
ARG EXTRAS=hf

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# Into the image's own Python (not a venv): KubeRay starts Ray through `bash -lc`, whose login profile
# resets PATH, and /usr/local/bin stays on it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" numpy

WORKDIR /opt/lowband
COPY pyproject.toml README.md ./
COPY compression ./compression
COPY protocols ./protocols
COPY coordinator ./coordinator
COPY worker ./worker
COPY deploy ./deploy
RUN pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}" "ray[default]==${RAY_VERSION}" \
    && python -c "import sys, torch; v = torch.__version__.split('+')[0]; \
sys.exit(None if v == '${TORCH_VERSION}' else f'torch {v} replaced the pinned ${TORCH_VERSION}')" \
    && lowband --help > /dev/null

# Not root; runs/ (the default run_dir) lives in the working directory.
RUN useradd --create-home --uid 1000 lowband && mkdir -p /work && chown lowband /work
USER lowband
WORKDIR /work
EXPOSE 7070
CMD ["lowband", "run", "diloco"]
