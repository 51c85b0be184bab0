# exfilwatch service image.
#
#   podman build -t exfilwatch .                     (or docker build)
#   openssl rand -hex 32 | podman secret create exfilwatch-token -
#   podman run -p 127.0.0.1:8080:8080 -v exfilwatch-state:/var/lib/exfilwatch \
#       --secret exfilwatch-token -e EXFILWATCH_API__TOKEN_FILE=/run/secrets/exfilwatch-token \
#       exfilwatch
#
# The API listens on every interface of the container, and the service refuses to start there
# without a write token (a file named by EXFILWATCH_API__TOKEN_FILE, or EXFILWATCH_API__TOKEN);
# the image holds none. EXFILWATCH_API__READ_TOKEN_FILE guards incident reads the same way.
#
# Build arguments:
#   BASE_IMAGE   a Debian 12 based image, with or without Python (Python 3.11 comes from Debian
#                when the base has none), e.g. localhost/debian:bookworm where no image registry
#                can be reached.
#   PIP_INDEX    package index URL for pip (empty: pip's own default or the build's PIP_* setup)
#   PIP_EXTRA_INDEX  extra index URLs for pip, separated by spaces (empty: none)
# Build secret (optional):
#   pip_cert     a CA bundle for pip, where the index is reached through a TLS-inspecting proxy:
#                --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt
#
# Layout in the image:
#   /etc/exfilwatch/exfilwatch.toml   config (mount a file or ConfigMap over it)
#   /models                           model root, the bundled `default` model (mount your own)
#   /var/lib/exfilwatch               the one state volume: store, journals, snapshots, spool/
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX=""
ARG PIP_EXTRA_INDEX=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           python3 python3-venv ca-certificates >/dev/null \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/exfilwatch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY detector ./detector
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/exfilwatch/bin/pip install --quiet \
        ${PIP_INDEX:+--index-url "$PIP_INDEX"} \
        ${PIP_EXTRA_INDEX:+--extra-index-url "$PIP_EXTRA_INDEX"} \
        . \
    && find /opt/exfilwatch -name '__pycache__' -prune -exec rm -rf {} + \
    && find /opt/exfilwatch -path '*/tests/*' -name '*.py' -delete \
    && rm -rf /opt/exfilwatch/lib/python3*/site-packages/pip \
              /opt/exfilwatch/lib/python3*/site-packages/setuptools \
              /opt/exfilwatch/bin/pip*

FROM ${BASE_IMAGE}
RUN if ! command -v python3 >/dev/null; then \
        apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           python3 ca-certificates >/dev/null \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    fi \
    && groupadd --system --gid 10001 exfilwatch \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/exfilwatch \
       --no-create-home --shell /usr/sbin/nologin exfilwatch \
    && mkdir -p /var/lib/exfilwatch/spool /etc/exfilwatch \
    && chown -R 10001:10001 /var/lib/exfilwatch \
    && chmod 0700 /var/lib/exfilwatch
COPY --from=build /opt/exfilwatch /opt/exfilwatch
COPY --chown=10001:10001 models /models
COPY deploy/exfilwatch.toml /etc/exfilwatch/exfilwatch.toml
ENV PATH=/opt/exfilwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
USER 10001:10001
WORKDIR /var/lib/exfilwatch
VOLUME ["/var/lib/exfilwatch"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EXFILWATCH_API__PORT', '8080'), timeout=4)"]
ENTRYPOINT ["exfilwatch"]
CMD ["serve", "--config", "/etc/exfilwatch/exfilwatch.toml"]
