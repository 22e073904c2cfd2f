# syntax=docker/dockerfile:1.7
# Triton Inference Server with the Python packages clinisynth's model repository imports
# (its model.py files import clinisynth_server.methods, torch, diffusers, transformers).
#   docker build -f deploy/docker/triton.Dockerfile -t clinisynth/triton:dev .
# The model repository is baked in at /models (from deploy/triton/models) so the image runs on
# its own; compose mounts the same folder, Kubernetes points --model-repository at the store.
# Build context: the repository root (see triton.Dockerfile.dockerignore).
# It starts only with its restricted-protocol key mounted (compose / Kubernetes do this), e.g.
#   docker run -v "$PWD/triton.key:/run/secrets/clinisynth-triton-key:ro" clinisynth/triton:dev

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

# --- build: a wheel of the clinisynth package, and the Python backend stub for Python 3.11 ----
# clinisynth requires Python 3.11 while NVIDIA's 24.10 container ships 3.10. The nvidia-pytriton
# wheel carries the Python backend stub of the same Triton (2.51) built for 3.11: it replaces the
# container's stub, and model.py then runs on a 3.11 venv.
FROM ${TRITON_IMAGE} AS build
ARG PYTRITON_VERSION=0.7.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/build && /opt/build/bin/pip install --upgrade pip wheel setuptools
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY clients ./clients
COPY services ./services
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/build/bin/pip install --no-deps --target /tmp/pytriton "nvidia-pytriton==${PYTRITON_VERSION}" \
 && mkdir -p /stub \
 && cp /tmp/pytriton/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub /stub/

# --- runtime ----------------------------------------------------------------------------------
FROM ${TRITON_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG DIFFUSERS_VERSION=0.42.1
ARG TRANSFORMERS_VERSION=5.23.0
ARG SAFETENSORS_VERSION=0.8.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/clinisynth
# PyPI's Linux torch wheel is the CUDA build, which is what a GPU Triton wants.
# numpy<2: the Python backend's stub and triton_python_backend_utils are built against numpy 1.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    /opt/clinisynth/bin/pip install \
      "torch==${TORCH_VERSION}" \
      "diffusers==${DIFFUSERS_VERSION}" \
      "transformers==${TRANSFORMERS_VERSION}" \
      "safetensors==${SAFETENSORS_VERSION}" \
      "numpy<2" \
 && /opt/clinisynth/bin/pip install --no-deps /wheels/*.whl \
 && /opt/clinisynth/bin/python -c "import clinisynth_server, torch, diffusers, transformers"
COPY --from=build --chmod=0755 /stub/triton_python_backend_stub /opt/tritonserver/backends/python/triton_python_backend_stub
COPY --chown=1000:1000 deploy/triton/models /models
# The stub embeds Python 3.11 and imports model.py's packages from the venv.
ENV PYTHONPATH=/opt/clinisynth/lib/python3.11/site-packages \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    PYTHONDONTWRITEBYTECODE=1
# Started through clinisynth's entrypoint, not tritonserver directly: it reads the
# restricted-protocol key from a mounted secret file and adds --grpc-restricted-protocol /
# --http-restricted-api for every group but health (the list is read from the installed
# clinisynth_server.triton.launcher, the one the local stack uses), strips secret-looking
# variables from Triton's environment and sets umask 077; see deploy/docker/triton-entrypoint.py.
# Without a readable key file the container exits at once (fail closed).
COPY --chmod=0755 deploy/docker/triton-entrypoint.py /opt/clinisynth/bin/clinisynth-triton-entrypoint
# triton-server (uid 1000) is the unprivileged user NVIDIA's image ships.
USER 1000:1000
EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/clinisynth/bin/python", "/opt/clinisynth/bin/clinisynth-triton-entrypoint"]
CMD ["--restricted-key-file=/run/secrets/clinisynth-triton-key", \
     "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*", \
     "--strict-readiness=true", "--exit-on-error=false", "--log-format=ISO8601"]
