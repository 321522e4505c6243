# The bridge's container image: `bridge serve` on 0.0.0.0:8080 as a non-root user.
# Stage 1 builds every wheel from requirements.lock (hash-checked) and the bridge's own wheel into a
# virtual environment; stage 2 is a clean slim image with only that environment copied in.

FROM python:3.11-slim-bookworm AS build
# Compilers only here, for a dependency without a binary wheel for this platform; none reach the final image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY bridge ./bridge
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl \
    && /opt/venv/bin/pip check

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_DATA_DIR=/var/lib/bridge \
    BRIDGE_LOG_FORMAT=json \
    BRIDGE_HOST=0.0.0.0 \
    BRIDGE_PORT=8080
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --home-dir /var/lib/bridge --shell /usr/sbin/nologin bridge \
    && mkdir -p /var/lib/bridge \
    && chown bridge:bridge /var/lib/bridge
COPY --from=build /opt/venv /opt/venv
USER bridge
WORKDIR /var/lib/bridge
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"]
# SIGTERM starts the drain (BRIDGE_DRAIN_SECONDS, then a goodbye of up to 10 s): give `docker stop` -t 45.
STOPSIGNAL SIGTERM
CMD ["bridge", "serve", "--host", "0.0.0.0"]
