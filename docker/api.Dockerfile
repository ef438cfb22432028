# syntax=docker/dockerfile:1
# The FastIF REST API: FastAPI under uvicorn, no torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t fastif-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FASTIF_DATA_ROOT=/data

# Dependencies first, in their own layer, so a source change does not reinstall them.
# The pip cache lives in a BuildKit cache mount: reused across builds, never in the image.
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements-api.txt

# The whole build context (trimmed by .dockerignore) rather than a list of package folders:
# pyproject.toml's package list and README.md change as the project grows, and a folder
# missing from a hand-kept COPY list only shows up as a broken image.
# --no-deps: pyproject.toml also lists torch, transformers and faiss for the workers;
# the API must not pull them (gigabytes, and a CUDA build by default).
COPY . /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src

# Non-root. The same uid as the worker image, so both can write the shared /data volume;
# /data is created here owned by that user, and Docker copies that ownership into an
# empty named volume the first time it is mounted.
RUN groupadd --gid 10001 fastif \
 && useradd --create-home --uid 10001 --gid 10001 fastif \
 && install -d -o fastif -g fastif /data
# Numeric, so that runtimes can verify "not root" without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/fastif

EXPOSE 8000
# python:3.11-slim has no curl; the standard library is enough. /healthz touches nothing
# but the process itself (see API.md), so this says "the API answers", not "Redis is up".
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["fastif", "serve", "--host", "0.0.0.0", "--port", "8000"]
