# syntax=docker/dockerfile:1
# Wick's container images. Two targets:
#   docker build -t wick .                   # default: CUDA (needs the NVIDIA container toolkit)
#   docker build --target cpu -t wick:cpu .  # CPU only
# Run (the model comes from the environment: a path in a volume, or a Hub repository):
#   docker run --gpus all -p 8080:8080 -v /models:/models -e WICK_MODEL=/models/m.gguf wick
#   docker run -p 8080:8080 -e WICK_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct wick:cpu
# Every option is also a WICK_* variable (see `wick serve --help`, config/default.toml).

ARG RUST_VERSION=1.95
ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

# ---- CPU build ----
FROM rust:${RUST_VERSION}-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin wick && cp target/release/wick /wick

# ---- CUDA build: candle's kernels are compiled by nvcc here ----
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build-cuda
ARG RUST_VERSION
# 90 = H100/H200. Set e.g. 80 (A100), 89 (L4/L40S), 120 (RTX 50xx).
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features cuda --bin wick && cp target/release/wick /wick

# ---- CPU runtime ----
FROM debian:bookworm-slim AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/wick wick \
    && mkdir -p /data/huggingface && chown wick /data/huggingface
COPY --from=build-cpu /wick /usr/local/bin/wick
COPY config/default.toml /etc/wick/default.toml
USER wick
ENV WICK_CONFIG=/etc/wick/default.toml WICK_HOST=0.0.0.0 WICK_PORT=8080 HF_HOME=/data/huggingface
EXPOSE 8080
# Readiness: 200 once the model is loaded, 503 while loading or draining.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${WICK_PORT}/health" >/dev/null || exit 1
# SIGTERM drains (WICK_DRAIN_TIMEOUT, default 30 s); give `docker stop -t` at least that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["wick", "serve"]

# ---- CUDA runtime (the default target: last) ----
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/wick wick \
    && mkdir -p /data/huggingface && chown wick /data/huggingface
COPY --from=build-cuda /wick /usr/local/bin/wick
COPY config/default.toml /etc/wick/default.toml
USER wick
ENV WICK_CONFIG=/etc/wick/default.toml WICK_HOST=0.0.0.0 WICK_PORT=8080 WICK_DEVICE=cuda \
    HF_HOME=/data/huggingface
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${WICK_PORT}/health" >/dev/null || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["wick", "serve"]
