# syntax=docker/dockerfile:1
# cortex: the coordinator. Holds no weights and needs no GPU, so it runs on a slim Python base.
#
#   docker build -f docker/cortex.Dockerfile -t cortex-neuron/cortex .      (from the repo root)
#   docker run -p 50051:50051 cortex-neuron/cortex
#
# The image carries the whole distribution (cortex, neuron, common): cortex's stubs import the
# neuron protos, `cortex health` is the HEALTHCHECK of both images and `cortex demo` runs neurons.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------- build: a venv with the package
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Every dependency ships manylinux wheels, so no compiler is needed here either; the separate stage
# keeps pip's caches, the sources and the build backend out of the final image.
COPY pyproject.toml README.md ./
COPY common ./common
COPY cortex ./cortex
COPY neuron ./neuron
# Byte-compile once here: the non-root user cannot write __pycache__ into /opt/venv later.
RUN pip install --no-compile . && python -m compileall -q /opt/venv/lib \
    && cortex --help >/dev/null && neuron serve --help >/dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cortex" \
      org.opencontainers.image.description="cortex coordinator of the cortex/neuron LLM inference service"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CORTEX_LISTEN=0.0.0.0:50051 \
    CORTEX_HTTP_LISTEN=0.0.0.0:8000 \
    CORTEX_LOG_FORMAT=json
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/app
EXPOSE 50051 8000
# `cortex health ADDR` exits 0 only when the gRPC health service answers SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["cortex", "health", "127.0.0.1:50051"]
# SIGTERM (docker stop) drains: health NOT_SERVING, new calls refused, in-flight calls finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cortex"]
# Settings come from CORTEX_* variables (above; override with -e) or flags after `serve`.
CMD ["serve"]
