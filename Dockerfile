# The API-key auth sidecar: `docker build -t apikey-sidecar .`
# Runs `sidecar serve` as a non-root user; settings come from SIDECAR_* variables
# (config/sidecar.env.example). Other commands: `docker run --rm apikey-sidecar check-config`.

# Install into a virtualenv in a throw-away stage and copy only the virtualenv: the final image
# holds no sources, wheels or pip caches. Every dependency ships manylinux wheels for CPython
# 3.11, so no compiler is needed.
FROM python:3.11-slim AS build
RUN python -m venv /opt/sidecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN /opt/sidecar/bin/pip install --no-cache-dir --disable-pip-version-check ".[uvloop]"

FROM python:3.11-slim
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a name lookup.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/sidecar /opt/sidecar
# An empty working directory: the sidecar also reads settings from ./.env, and there is none.
WORKDIR /srv/sidecar
USER 10001:10001

EXPOSE 8080 9090
# slim has no curl: ask /healthz with Python, on the port SIDECAR_OPS_LISTEN names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SIDECAR_OPS_LISTEN', ':9090').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

ENTRYPOINT ["sidecar"]
CMD ["serve"]
