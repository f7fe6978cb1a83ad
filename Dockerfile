# syntax=docker/dockerfile:1
# monthly-token-reset: the `token-reset` CLI (listener, migrate, reset, status).
#
#   docker build -t monthly-token-reset \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#   docker run --rm -e DATABASE_URL=... -e CRON_SECRET=... -p 127.0.0.1:8080:8080 monthly-token-reset
#
# Two stages: the builder makes the project's wheel (which carries sql/ as
# listener/sql) and installs it with its dependencies, at the versions in
# constraints.txt (the ones the test suite ran with), into /opt/venv; the runtime
# stage copies only that venv onto a clean image, no compilers, no pip at all.
#
# The base is an exact Python release on an exact Debian release, the Python that
# constraints.txt was frozen with (tests/deploy/test_dockerfile.py holds them equal):
# a rebuild must not move to another Python or distribution by itself.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# No pip inside the venv: the base image's pip installs into it (--python).
RUN python -m venv --without-pip /opt/venv

WORKDIR /src
# .dockerignore keeps the context to what the wheel needs (and constraints.txt).
COPY . .

RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m pip --python /opt/venv/bin/python install -c constraints.txt /wheels/*.whl \
    && /opt/venv/bin/token-reset --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="monthly-token-reset" \
      org.opencontainers.image.description="Monthly token reset listener, metrics and scheduled reset endpoint" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/${PYTHON_IMAGE}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080

# The base image's pip (and setuptools, wheel) go: nothing in the running image can
# install software.  A fixed, non-root uid/gid (10001) so volume permissions and
# PodSecurity runAsNonRoot checks are predictable.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/app

EXPOSE 8080

# No curl in the image: the standard library does the probe. /healthz = alive;
# orchestrators should gate traffic on /readyz instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('HTTP_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

# The listener drains and exits within 10 s of SIGTERM.
STOPSIGNAL SIGTERM

ENTRYPOINT ["token-reset"]
CMD ["listen"]
