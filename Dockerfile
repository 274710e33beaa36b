# The incrementer image: `incrementer serve` on 0.0.0.0:3333, API keys required, the WAL on a volume.
#
#   podman build -t incrementer .            (or docker build; BuildKit or buildah)
#   podman run -e INCREMENTER_DATABASE_URL=postgresql://app@db:5432/counters -p 3333:3333 incrementer
#
# BASE_IMAGE is any Debian 12 based image with Python 3.11+: the official slim Python image by
# default; scripts/container-base makes one from Debian's packages where no registry is reachable.
# docs/operations.md ("Containers and Kubernetes") has the rest.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# --- builder: compiles the hot path with mypyc into a wheel, next to wheels of every dependency ---
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The official image has Python's headers in /usr/local; Debian's python3 needs python3-dev.
# Unpinned on purpose: the base image pins the Debian release, and the compiler only builds.
# hadolint ignore=DL3008
RUN headers="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"; \
    extra=""; if [ ! -e "$headers" ]; then extra="python3-dev"; fi; \
    apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev $extra \
    && rm -rf /var/lib/apt/lists/*
# pip trusts the system's CA store (not its own bundle): a build behind a TLS-inspecting proxy
# works with the host's /etc/ssl/certs mounted (podman build --volume /etc/ssl/certs:...:ro).
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# One wheel per dependency too, so the runtime stage installs without a network or a compiler.
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: the base image, a virtualenv installed from those wheels, nothing else -------------
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A fixed numeric user, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --gid 10001 incrementer \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/incrementer \
        --shell /usr/sbin/nologin incrementer \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/incrementer
# The wheels only: no compiler, no source tree. (A bind mount from the builder instead of this
# COPY would keep the wheels out of the layers, but buildah 1.28, Debian 12's podman, does not
# mount a builder stage it took from its cache.)
COPY --from=builder /wheels /tmp/wheels
RUN python3 -m venv /opt/incrementer \
    && /opt/incrementer/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        incrementer \
    && /opt/incrementer/bin/pip uninstall --yes --quiet pip setuptools \
    && rm -rf /tmp/wheels \
    && find /opt/incrementer -name __pycache__ -prune -exec rm -rf {} +
ENV PATH=/opt/incrementer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INCREMENTER_HOST=0.0.0.0 \
    INCREMENTER_PORT=3333 \
    INCREMENTER_DATA_DIR=/var/lib/incrementer/data
# The WAL (data/) and, with the SQLite default, incrementer.db: what a 202 promised lives here.
WORKDIR /var/lib/incrementer
VOLUME ["/var/lib/incrementer"]
USER 10001:10001
EXPOSE 3333
# SIGTERM drains: stop accepting, answer what is in flight, flush everything, exit 0. Give the
# runtime a stop timeout above --shutdown-timeout + 3 s (podman/docker stop -t 20).
STOPSIGNAL SIGTERM
# Liveness only (no curl in a slim image); readiness is /readyz, for the balancer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/opt/incrementer/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INCREMENTER_PORT', '3333'), timeout=2)"]
ENTRYPOINT ["incrementer"]
CMD ["serve"]
