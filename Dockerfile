# One image for the operator (`regmirror run`) and the node agent (`regmirror agent`).
#   make image        # docker build -t ghcr.io/regmirror/regmirror:<version> .
# Every third-party package comes from requirements.lock (`make lock`), checked
# against its hashes: the image holds the versions the tests ran (make install
# builds .venv from requirements-dev.lock, which pins the same ones). The
# build backend is in the lock too, so the package's own wheel is built
# without fetching anything unpinned. The final stage copies only the
# virtualenv: no wheel, pip cache or source tree ships. Works with and
# without BuildKit.
# Offline base image: --build-arg PYTHON_IMAGE=<a python:3.11-slim mirror>.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/regmirror \
    && /opt/regmirror/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
# README.md is optional (the glob keeps COPY from failing without it).
COPY pyproject.toml README.m[d] ./
COPY operator/ operator/
RUN /opt/regmirror/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/regmirror/bin/pip check \
    && /opt/regmirror/bin/pip uninstall --yes pip setuptools wheel \
    && rm -rf /opt/regmirror/lib/python3*/site-packages/kubernetes/aio
# kubernetes/aio (~40 MB) is an asyncio client nothing here imports (Kopf uses
# aiohttp itself). Bytecode stays: the root filesystem is read-only at run time,
# so without it every start would recompile the kubernetes client.

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="regmirror" \
      org.opencontainers.image.description="Kubernetes operator for pull-through registry mirrors, with node-level containerd and CRI-O configuration" \
      org.opencontainers.image.source="https://github.com/regmirror/regmirror" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/regmirror/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/regmirror /opt/regmirror
RUN regmirror version
# Numeric, so the kubelet can verify `runAsNonRoot` without /etc/passwd. The
# agent's DaemonSet runs it as 0 (root-owned host directories), nothing else does.
USER 65532:65532
ENTRYPOINT ["regmirror"]
CMD ["--help"]
