# syntax=docker/dockerfile:1
#
# outbox-relay container image.
#
#   docker build -t outbox-relay:0.1.0 .
#   docker run --rm -e DATABASE_URL=postgresql://app:secret@db:5432/app -p 9400:9400 \
#     --read-only --tmpfs /tmp outbox-relay:0.1.0
#
# or `make image`: podman, from local images only (tests/deploy/podman-setup makes a stand-in for
# the base where no registry is reachable), tagged outbox-relay:<version>.
#
# Base image: pinned by tag AND digest. The digest is the multi-architecture OCI index of
# python:3.11.15-slim-bookworm as published on Docker Hub (so amd64 and arm64 builds both resolve
# it). Refresh both together: `docker buildx imagetools inspect python:3.11.15-slim-bookworm`
# prints the index digest. The tag documents which Python it is; the digest is what is pulled.
# Both stages start from this one line, so they always share the interpreter the venv points at.
FROM python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3 AS base

# ---- builder: the package and its broker extras, in a venv ------------------------------------
FROM base AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# Every dependency ships manylinux wheels (psycopg[binary], confluent-kafka with librdkafka
# inside, orjson, pydantic-core), so the slim image needs no compiler. `python3`, not `python`:
# any Debian-based Python image has it.
RUN python3 -m venv /opt/outbox-relay

# The dependencies first, read from pyproject.toml alone (the build backend, the package's and
# the broker extras' requirements), in a layer of their own: it is rebuilt only when
# pyproject.toml changes, so a code change rebuilds the image in seconds instead of downloading
# every wheel again.
WORKDIR /src
COPY pyproject.toml ./
RUN /opt/outbox-relay/bin/python -c 'import sys, tomllib; t = tomllib.load(open("pyproject.toml", "rb")); p = t["project"]; print(*t["build-system"]["requires"], *p["dependencies"], *(r for e in sys.argv[1].split(",") for r in p["optional-dependencies"][e]), sep="\n")' \
       kafka,rabbitmq > /tmp/requirements.txt \
    && /opt/outbox-relay/bin/pip install --no-cache-dir --requirement /tmp/requirements.txt

# Then the code, without dependencies (all there: `pip check` proves it) and with the build
# backend already in the venv (no download). Not editable: the runtime stage gets the venv only,
# not /src. pip compiles the .pyc files here, so the read-only runtime never writes bytecode.
# pip and setuptools leave the venv last (about 25 MB the relay never uses); to add a plugin in
# an image of your own, use the base's pip: `python3 -m pip --python /opt/outbox-relay/bin/python`.
COPY README.md ./
COPY relay ./relay
COPY connectors ./connectors
RUN /opt/outbox-relay/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/outbox-relay/bin/pip check \
    && /opt/outbox-relay/bin/outbox-relay --version \
    && /opt/outbox-relay/bin/pip uninstall --yes --quiet pip setuptools

# ---- runtime ----------------------------------------------------------------------------------
FROM base AS runtime

LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Moves transactional-outbox events from PostgreSQL to message brokers." \
      org.opencontainers.image.licenses="Apache-2.0"

# Read-only root filesystem: no .pyc written at run time, logs unbuffered to stdout/stderr, and
# HOME points at /tmp, the only writable place (an emptyDir or tmpfs).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    PATH=/opt/outbox-relay/bin:${PATH} \
    OUTBOX_RELAY_HEALTH_URL=http://127.0.0.1:9400/healthz

# A numeric, non-root user: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin relay

COPY --from=builder /opt/outbox-relay /opt/outbox-relay
# A default config (the commented example: postgres-polling from ${DATABASE_URL} to stdout), so
# `docker run -e DATABASE_URL=...` works as is. Mount your own file over it, or the Helm chart's
# ConfigMap over the directory.
COPY config/relay.example.yaml /etc/outbox-relay/relay.yaml

USER 10001:10001
WORKDIR /tmp

# /metrics, /healthz, /readyz (the config's http.port, 9400 by default).
EXPOSE 9400

# No curl in the slim image: Python's urllib does it. A non-2xx answer or no answer raises, and
# the exit code is then 1. Set OUTBOX_RELAY_HEALTH_URL when http.port is not 9400.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['OUTBOX_RELAY_HEALTH_URL'], timeout=4)"]

# Exec form: the relay itself is PID 1 and receives SIGTERM directly (no shell in between that
# would swallow it). It installs its own SIGTERM/SIGINT handlers (stop fetching, finish and ack the
# in-flight events, flush the producer, exit 0 within shutdown_grace), which is what PID 1 needs:
# the kernel never applies a default "terminate" action to PID 1, only handlers it installed. The
# relay starts no child processes, so there are no zombies to reap and no init (tini) is needed.
# `docker run --init` or Kubernetes' shareProcessNamespace add one if you ever need it.
ENTRYPOINT ["outbox-relay"]
CMD ["run", "-c", "/etc/outbox-relay/relay.yaml"]
