# syntax=docker/dockerfile:1
# monthly-token-reset: the `token-reset` CLI (listener, migrate, reset, status).
#
#   docker build -t monthly-token-reset .
#   docker run --rm -e DATABASE_URL=... -e CRON_SECRET=... -p 8080:8080 monthly-token-reset
#
# Two stages: the builder makes the project's wheel (which carries sql/ as
# listener/sql) and installs it with its dependencies into /opt/venv; the runtime
# stage copies only that venv onto a clean python:3.12-slim, no compilers, no pip cache.

ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
# .dockerignore keeps the context to what the wheel needs.
COPY . .

RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install /wheels/*.whl \
    && /opt/venv/bin/token-reset --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="monthly-token-reset" \
      org.opencontainers.image.description="Monthly token reset listener, metrics and scheduled reset endpoint"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080

# A fixed, non-root uid/gid (10001) so volume permissions and PodSecurity
# runAsNonRoot checks are predictable.
RUN groupadd --system --gid 10001 app \
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
