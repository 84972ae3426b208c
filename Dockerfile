# The dml image: CUDA 13.0 + cuDNN runtime on Ubuntu 24.04 (Python 3.12), the project with its
# GPU extras in a virtual environment, run as a non-root user with `dml` as the entrypoint.
# torch==2.14.1 from PyPI is a CUDA 13 build and brings its own CUDA libraries; the base image
# matches that CUDA line for the NVIDIA container runtime. Not built on the development
# machines (no Docker there): tests/test_dockerfile.py lints it and checks what it references.
#   docker build -t dml:dev .
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The base image's tag pins the Ubuntu release and with it the Python 3.12 packages; pinning
# Debian revisions as well breaks the build whenever the archive drops an old revision.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dml ./dml
COPY pipeline ./pipeline
# Every dependency is pinned in pyproject.toml. faiss-cpu (a base dependency) and the GPU
# extra's faiss-gpu-cu13-cuvs both install the `faiss` package: removing faiss-cpu deletes the
# files they share, so the GPU wheel is reinstalled (same pin as pyproject's `gpu` extra).
RUN pip install --no-cache-dir "./[gpu]" \
 && pip uninstall -y faiss-cpu faiss-gpu-cu13-cuvs \
 && pip install --no-cache-dir --no-deps "faiss-gpu-cu13-cuvs==1.15.0" \
 && dml --help > /dev/null

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# Same reason as above for not pinning Debian revisions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 dml \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dml \
 && install -d -o dml -g dml /workspace
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1
# Relative paths in configs (runs/...) land in /workspace, writable by the dml user.
WORKDIR /workspace
COPY configs ./configs
# Numeric user, so Kubernetes can verify runAsNonRoot without a runAsUser.
USER 10001:10001
ENTRYPOINT ["dml"]
CMD ["--help"]
