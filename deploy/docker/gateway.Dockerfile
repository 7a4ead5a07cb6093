# The gateway: `loragate serve` in front of engines run elsewhere (LORAGATE_ENGINE__URLS or
# --engine-url; this image has no vLLM). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t loragate-gateway .
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The venv is built here; the final stage copies it and nothing else (no pip cache, no sources).
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY adapters/ adapters/
COPY deploy/docker/install.sh deploy/docker/install.sh
RUN bash deploy/docker/install.sh /opt/loragate gateway

FROM ${BASE_IMAGE}
RUN useradd --system --no-log-init --user-group --uid 10001 \
        --create-home --home-dir /var/lib/loragate loragate
COPY --from=builder /opt/loragate /opt/loragate
# The metrics listener binds loopback by default: in a container the scraper is elsewhere.
ENV PATH=/opt/loragate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LORAGATE_CACHE_DIR=/var/lib/loragate \
    LORAGATE_METRICS__HOST=0.0.0.0
# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001:10001
WORKDIR /var/lib/loragate
EXPOSE 8000 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LORAGATE_PORT', '8000'), timeout=4)"]
# dumb-init is PID 1: it forwards SIGTERM to the server, which drains and exits.
ENTRYPOINT ["dumb-init", "--"]
CMD ["loragate", "serve", "--host", "0.0.0.0"]
