# The idembed service image: FastAPI + onnxruntime serving a model bundle. No TensorFlow (see Dockerfile.train).
#
#   docker build -t idembed:latest .                                  # installs from PyPI
#   deploy/build_wheelhouse.sh serve,pg && docker build -t idembed .  # installs offline from ./wheels
#
# BASE_IMAGE may be any Debian-like image with python3 (3.11) and python3-venv, e.g. one built locally where no
# registry is reachable (docs/deployment.md shows how).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS runtime-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed uid/gid lets operators chown host bind mounts (models, data) before the first start.
RUN groupadd --system --gid 10001 idembed \
    && useradd --system --uid 10001 --gid idembed --home-dir /app --no-create-home --shell /usr/sbin/nologin idembed

FROM runtime-base AS builder
WORKDIR /build
# `wheel[s]` is a glob so this COPY also works without ./wheels (then pip uses PyPI); the wheels land in
# /wheelhouse beside the two files that always exist.
COPY pyproject.toml deploy/requirements_from_pyproject.py wheel[s] /wheelhouse/
ARG EXTRAS=serve,pg
# Dependencies first, in their own layer: it stays cached until pyproject.toml changes.
RUN python3 -m venv /opt/venv \
    && if ls /wheelhouse/*.whl > /dev/null 2>&1; then echo "--no-index --find-links /wheelhouse"; fi > pip-source \
    && pip install $(cat pip-source) --upgrade pip \
    && python3 /wheelhouse/requirements_from_pyproject.py "$EXTRAS" --pyproject /wheelhouse/pyproject.toml \
       > requirements.txt \
    && pip install $(cat pip-source) -r requirements.txt
COPY pyproject.toml README.md ./
COPY bundle/ bundle/
COPY service/ service/
# training/ is here only so setuptools' package list matches the repository; without the train extra it is
# inert, and the service never imports it.
COPY training/ training/
# The image must not carry TensorFlow (size, attack surface): fail the build if a dependency pulled it in.
# pip and setuptools are not needed at run time.
RUN pip install $(cat pip-source) --no-deps . \
    && python -c "import importlib.util as u, sys; sys.exit('tensorflow in service image' if u.find_spec('tensorflow') else 0)" \
    && pip uninstall --yes --quiet setuptools wheel pip

FROM runtime-base AS service
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The default bundle is baked in; a named volume mounted on /app/models starts as a copy of it.
COPY --chown=idembed:idembed models/ /app/models/
COPY deploy/healthcheck.py /usr/local/bin/idembed-healthcheck
RUN mkdir -p /app/data && chown idembed:idembed /app /app/data && chmod 0755 /usr/local/bin/idembed-healthcheck
USER idembed
# In a container with its own network namespace the service must listen beyond loopback; with host networking
# (docker-compose.yml) set IDEMBED_HOST=127.0.0.1 to keep it local.
ENV IDEMBED_HOST=0.0.0.0 \
    IDEMBED_PORT=8000 \
    IDEMBED_BUNDLE_PATH=/app/models/default \
    IDEMBED_MODELS_DIR=/app/models \
    IDEMBED_STORE_URL=sqlite:////app/data/identities.sqlite3
EXPOSE 8000
VOLUME ["/app/data"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["idembed-healthcheck"]
ENTRYPOINT ["idembed-serve"]
