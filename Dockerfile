# The API-key auth sidecar: `docker build --build-arg VERSION=0.1.0 -t apikey-sidecar .`
# Runs `sidecar serve` as a non-root user; settings come from SIDECAR_* variables
# (config/sidecar.env.example). Other commands: `docker run --rm apikey-sidecar check-config`.
#
# Reproducible: every Python package comes from deploy/docker/requirements.lock, pinned with
# the sha256 of its files (refresh it with deploy/docker/lock.sh). For a byte-identical base
# too, pin it by digest: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11-slim

# Install into a virtualenv in a throw-away stage and copy only the virtualenv: the final image
# holds no sources, wheels or pip caches. Every dependency ships manylinux wheels for CPython
# 3.11, so no compiler is needed.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sidecar
WORKDIR /src
# The dependencies first, in a layer of their own that a change of the sources keeps. Hash
# checking also refuses any dependency the lock does not pin.
COPY deploy/docker/requirements.lock ./
RUN /opt/sidecar/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# The package itself, built with the locked setuptools (no isolated build environment, which
# would fetch an unpinned one); then the installers leave: nothing at run time needs them.
RUN /opt/sidecar/bin/pip install --no-deps --no-build-isolation . \
    && /opt/sidecar/bin/pip check \
    && /opt/sidecar/bin/python -m pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE}
# OCI annotations. VERSION follows pyproject.toml (a test checks the default); a release build
# sets SOURCE (the repository's URL) and REVISION (the commit) with --build-arg.
ARG VERSION=0.1.0
ARG SOURCE=""
ARG REVISION=""
LABEL org.opencontainers.image.title="apikey-sidecar" \
      org.opencontainers.image.description="API-key authentication sidecar: Bearer tokens checked through an in-process cache, Redis and Postgres, identity headers injected." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The base image's own installers go too: the image runs one program and installs nothing.
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a name lookup.
RUN python -m pip uninstall --yes --disable-pip-version-check pip setuptools wheel \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/sidecar /opt/sidecar
# An empty working directory: the sidecar also reads settings from ./.env, and there is none.
WORKDIR /srv/sidecar
USER 10001:10001

EXPOSE 8080 9090
# GET /healthz on the address SIDECAR_OPS_LISTEN names (a wildcard is dialled on the loopback
# of its family, so `[::]:9090` and `[::1]:9090` work too); no dependency is asked.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["sidecar", "healthcheck", "--timeout", "2"]

ENTRYPOINT ["sidecar"]
CMD ["serve"]
