# syntax=docker/dockerfile:1
# neuron: the GPU node agent, on NVIDIA's CUDA 12 runtime image with CuPy (cupy-cuda12x).
#
#   docker build -f docker/neuron.Dockerfile -t cortex-neuron/neuron .      (from the repo root)
#   docker run --gpus all -v /srv/models:/models:ro -p 50061:50061 cortex-neuron/neuron
#
# CUDA libraries: the `runtime` flavour of nvidia/cuda has cudart, cuBLAS, NVRTC (CuPy compiles its
# kernels at run time with NVRTC, no nvcc needed) and NCCL: NVIDIA's runtime images install the
# `libnccl2` package from NVIDIA's CUDA apt repository (held at the version the image was built
# with), and CuPy's `cupy.cuda.nccl` loads that libnccl.so.2. cupy-cuda12x does not pull NCCL
# itself (it has no `nvidia-nccl-cu12` dependency), so the build checks that the base image has it.
# The host needs the NVIDIA driver and the NVIDIA Container Toolkit; the driver must support the
# CUDA version of the base image (or use CUDA's forward compatibility): pick another tag with
# --build-arg CUDA_IMAGE=... if yours is older.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---------------------------------------------------------------- build: a venv with the package
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# Ubuntu 24.04's python3 is 3.12; python3-venv brings ensurepip. Nothing here compiles: CuPy,
# grpcio, numpy, tokenizers and safetensors all install from wheels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY cortex ./cortex
COPY neuron ./neuron
# Byte-compile once here: the non-root user cannot write __pycache__ into /opt/venv later.
RUN pip install --no-compile ".[cuda12]" && python -m compileall -q /opt/venv/lib \
    && neuron serve --help >/dev/null && cortex --help >/dev/null

# ---------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE}
ARG CUDA_IMAGE
LABEL org.opencontainers.image.title="neuron" \
      org.opencontainers.image.description="neuron GPU node agent of the cortex/neuron LLM inference service"
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter: no pip, no venv tooling, no compilers in the final image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && (ldconfig -p | grep -q 'libnccl\.so\.2' \
        || (echo "libnccl.so.2 is missing from ${CUDA_IMAGE}: use an nvidia/cuda *-runtime image" >&2; exit 1))
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CUPY_CACHE_DIR=/home/app/.cupy/kernel_cache \
    NEURON_LISTEN=0.0.0.0:50061 \
    NEURON_METRICS_LISTEN=0.0.0.0:9400 \
    NEURON_MODEL_ROOT=/models \
    NEURON_DRAIN_SECONDS=30 \
    NEURON_LOG_FORMAT=json \
    NCCL_NVLS_ENABLE=0
USER 10001:10001
WORKDIR /home/app
# Checkpoints: mount the host's model directory read-only at /models (-v /srv/models:/models:ro);
# NEURON_MODEL_ROOT=/models, and loads of paths outside the model roots are refused.
# 50061: gRPC (cortex -> neuron, leader -> follower step streams). NCCL and the CPU collectives
# engine also listen on ephemeral TCP ports between neurons: see docs/operations.md ("Ports").
EXPOSE 50061 9400
# `cortex health ADDR` (shipped in this image) exits 0 only when the neuron answers SERVING; while
# it drains after SIGTERM it answers NOT_SERVING, so the container turns unhealthy at once.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["cortex", "health", "127.0.0.1:50061"]
# SIGTERM (docker stop): health NOT_SERVING, new requests refused with UNAVAILABLE, in-flight
# generations get NEURON_DRAIN_SECONDS to finish, then device memory is released and it exits 0.
# Give `docker stop -t` / stop_grace_period more than the drain time.
STOPSIGNAL SIGTERM
# Settings come from NEURON_* variables (above; override with -e) or flags after `serve`.
ENTRYPOINT ["neuron"]
CMD ["serve"]
