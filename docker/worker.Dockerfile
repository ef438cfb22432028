# syntax=docker/dockerfile:1
# A FastIF Celery worker (torch + transformers + faiss). One file for CPU and GPU: the only
# difference between them is which torch build is installed, so a build argument picks it.
#   CPU: docker build -f docker/worker.Dockerfile -t fastif-worker:cpu .
#   GPU: docker build -f docker/worker.Dockerfile --build-arg TORCH_VARIANT=cu128 -t fastif-worker:gpu .
#
# The GPU image is python:3.11-slim too, not an nvidia/cuda base: torch's CUDA wheels bring
# their own CUDA runtime, cuDNN and NCCL as pip packages, and the NVIDIA container toolkit
# mounts the host's driver into the container at run time. An nvidia/cuda base would add a
# second copy of the CUDA libraries and a different Python, and nothing else.
FROM python:3.11-slim

# `cpu`, or a CUDA tag of the PyTorch wheel index (cu126, cu128, ...). cu128 needs a host
# driver for CUDA 12.8 (>= 570).
ARG TORCH_VARIANT=cpu
# Keep in step with the Makefile's pin.
ARG TORCH_VERSION=2.13.0

# NVIDIA_DRIVER_CAPABILITIES is read by the NVIDIA container toolkit (harmless on CPU hosts).
# HF_HUB_OFFLINE: models and tokenizers load from the data volume; no hub at run time
# (DESIGN.md), and an offline host should fail fast rather than wait on a network timeout.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FASTIF_DATA_ROOT=/data \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1

# 0. A C++ compiler for FASTIF_COMPILE=1: torch.compile's inductor builds C++ kernels on the
#    CPU, and Triton's launcher on the GPU. Without it a compiled H·v falls back to eager.
#    Not pinned: any Debian bookworm g++ will do, and a pin breaks at each point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

# 1. torch alone, from the index of the chosen build, before anything that depends on it:
#    left to `pip install .`, pip would fetch PyPI's default (CUDA) build. It is the biggest
#    layer, so it comes first and is rebuilt only when the build arguments change.
#    The pip cache is a BuildKit cache mount: reused across builds, never in the image.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

# 2. The project's other dependencies, read from pyproject.toml so that there is no second
#    list to keep in step. torch is already satisfied (pyproject asks only torch>=2.4), so
#    pip keeps the build from step 1. Copying pyproject.toml alone keeps this layer cached
#    across source changes.
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# 3. The project itself: the whole build context trimmed by .dockerignore (see
#    api.Dockerfile for why not a list of folders). The last command fails the build if
#    anything replaced the torch build from step 1; it reads package metadata only and does
#    not import torch (CUDA must never be initialised before the worker forks, and a build
#    host has no GPU anyway).
COPY . /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install /src \
 && python -c "import importlib.metadata as m, sys; v = m.version('torch'); ok = v.split('+')[0] == '${TORCH_VERSION}' and ('${TORCH_VARIANT}' == 'cpu' or v.endswith('+${TORCH_VARIANT}')); sys.exit(0 if ok else 'torch %s was installed over ${TORCH_VERSION}+${TORCH_VARIANT}' % v)"

# Non-root, with the same uid as the API image so that both can write the shared /data
# volume; /data is created owned by that user, and Docker copies that ownership into an
# empty named volume the first time one is mounted there.
RUN groupadd --gid 10001 fastif \
 && useradd --create-home --uid 10001 --gid 10001 fastif \
 && install -d -o fastif -g fastif /data
# Numeric, so that runtimes can verify "not root" without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/fastif

# No HEALTHCHECK: a Celery worker serves no port. `GET /readyz` on the API reports whether
# at least one worker answers. Celery's default node name, celery@<container hostname>, is
# unique per container; docker-compose.yml gives readable ones.
CMD ["fastif", "worker", "--queues", "cpu,accel", "--concurrency", "1"]
