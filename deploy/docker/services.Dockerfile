# syntax=docker/dockerfile:1.7
# One image for the four clinisynth services (and the finetune training workers).
#   docker build -f deploy/docker/services.Dockerfile -t clinisynth/services:dev .
#   docker run clinisynth/services:dev generator|reward|counterfactual|finetune
# GPU build for the finetune workers (CUDA build of the same torch):
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Build context: the repository root (see services.Dockerfile.dockerignore).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: compilers live here only ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/clinisynth \
    PATH=/opt/clinisynth/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv "$VIRTUAL_ENV" && pip install --upgrade pip wheel
# torch first, from its own index, pinned: a bare `torch` would pull the multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY clients ./clients
COPY services ./services
RUN pip install ".[server]" "torch==${TORCH_VERSION}" \
 && clinisynth-serve --help >/dev/null
COPY --chmod=0755 deploy/docker/healthcheck.py /opt/clinisynth/bin/clinisynth-healthcheck
RUN sed -i '1s|.*|#!/opt/clinisynth/bin/python|' /opt/clinisynth/bin/clinisynth-healthcheck

# --- runtime: no compilers, no pip cache, non-root --------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="clinisynth services" \
      org.opencontainers.image.description="clinisynth generator, reward, counterfactual and finetune gRPC services" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 clinisynth \
 && useradd --uid 10001 --gid 10001 --home-dir /home/clinisynth --create-home \
            --shell /usr/sbin/nologin clinisynth \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/clinisynth
COPY --from=build /opt/clinisynth /opt/clinisynth
ENV PATH=/opt/clinisynth/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/clinisynth \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    CLINISYNTH_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/clinisynth
# gRPC ports, metrics ports, reward's review page.
EXPOSE 50051 50052 50053 50054 9101 9102 9103 9104 8080
# tini reaps torchrun's worker processes and forwards SIGTERM for a graceful gRPC drain.
ENTRYPOINT ["/usr/bin/tini", "--", "clinisynth-serve"]
CMD ["generator"]
