# syntax=docker/dockerfile:1
#
# memex container image. Every build step lives in scripts/build.sh (CI runs the same script for
# the CPU variant); this file only picks base images and wires the stages.
#
#   GPU (default; H100/H200 = compute capability 90):
#     docker build -t memex:cuda .
#     docker build -t memex:cuda-fa --build-arg FLASH_ATTN=1 .
#     docker build -t memex:cuda-a100 --build-arg CUDA_COMPUTE_CAP=80 .
#   CPU:
#     docker build -t memex:cpu --build-arg VARIANT=cpu .
#
#   docker run --gpus all -p 8080:8080 -v /srv/models/extractor:/models:ro \
#     -v /srv/memex/keys.txt:/run/secrets/memex-keys:ro -e MEMEX_API_KEYS=/run/secrets/memex-keys memex:cuda
#
# Configuration is by MEMEX_* environment variables (every `memex serve` flag has one; see README).
# The model is mounted at /models: a safetensors directory, or set MEMEX_MODEL=/models/<file>.gguf.

ARG VARIANT=cuda
ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

# ---------------------------------------------------------------- build stages (one per variant)
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
FROM ubuntu:${UBUNTU_VERSION} AS build-cpu

FROM build-${VARIANT} AS build
ARG VARIANT
ARG CUDA_COMPUTE_CAP=90
ARG FLASH_ATTN=0
ARG RUST_TOOLCHAIN=stable
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} RUST_TOOLCHAIN=${RUST_TOOLCHAIN} CARGO_TARGET_DIR=/cache/target
WORKDIR /src
COPY scripts/build.sh scripts/build.sh
RUN scripts/build.sh --variant ${VARIANT} build-deps
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cache/target,id=memex-target-${VARIANT}-${CUDA_COMPUTE_CAP} \
    FLASH_ATTN=${FLASH_ATTN} scripts/build.sh --variant ${VARIANT} --prefix /opt/memex build check

# ---------------------------------------------------------------- runtime stages (one per variant)
# CUDA: the `base` image (CUDA runtime only); build.sh adds cuBLAS, cuRAND and NVRTC.
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS runtime-cuda
# The NVIDIA container runtime mounts the driver: libcuda, and nvidia-smi (utility capability).
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
FROM ubuntu:${UBUNTU_VERSION} AS runtime-cpu

FROM runtime-${VARIANT} AS runtime
ARG VARIANT
COPY scripts/build.sh /tmp/build.sh
RUN /tmp/build.sh --variant ${VARIANT} runtime-deps
COPY --from=build /opt/memex/bin/ /usr/local/bin/
RUN /tmp/build.sh --variant ${VARIANT} --prefix /usr/local check && rm /tmp/build.sh

USER memex
WORKDIR /home/memex
ENV MEMEX_MODEL=/models \
    MEMEX_HOST=0.0.0.0 \
    MEMEX_PORT=8080 \
    MEMEX_LOG_JSON=true
EXPOSE 8080
# Ready = model loaded and warmed up; a loading model takes a while on first start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["memex-healthcheck"]
# SIGTERM drains in-flight requests before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["memex"]
CMD ["serve"]
