# syntax=docker/dockerfile:1
# ringside-engine and ringside-agent in one image (deploy/kubernetes runs the
# two containers of a pod from it).
#   docker build -t ringside .                          CPU (x86-64-v3: AVX2)
#   docker build --build-arg CPU_LEVEL=x86-64-v4 .      AVX-512 hosts
#   docker build --build-arg CUDA=1 .                   CUDA offload (--n-gpu-layers)
ARG CUDA=0
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04
ARG CUDA_RUNTIME=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM rust:1.95-bookworm AS build-cpu
FROM ${CUDA_IMAGE} AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/root/.cargo/bin:$PATH

FROM build-cpu AS build-0
FROM build-cuda AS build-1
FROM build-${CUDA} AS build
ARG CUDA
# Never target-cpu=native: build hosts advertise AMX that VMs refuse (SIGILL).
ARG CPU_LEVEL=x86-64-v3
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-cpu=${CPU_LEVEL}" cargo build --release --locked \
        -p ringside-agent -p ringside-engine $( [ "$CUDA" = 1 ] && echo --features ringside-engine/cuda ) \
    && install -D -m 0755 target/release/ringside-engine target/release/ringside-agent /out/

FROM debian:bookworm-slim AS runtime-0
FROM ${CUDA_RUNTIME} AS runtime-1
FROM runtime-${CUDA}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3-pip libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd -g 10000 ringside && useradd -u 10001 -g ringside -M -s /usr/sbin/nologin ringside-engine \
    && useradd -u 10002 -G ringside -M -s /usr/sbin/nologin ringside-agent
COPY --from=build /out/ /usr/local/bin/
COPY scripts/install-model.sh /usr/local/bin/install-model.sh
ENV RINGSIDE_CACHE_DIR=/var/lib/ringside OMP_WAIT_POLICY=passive
USER 10001:10000
EXPOSE 8000 9464
ENTRYPOINT ["/usr/local/bin/ringside-engine"]
CMD ["serve", "--host", "0.0.0.0"]
