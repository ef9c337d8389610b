#!/usr/bin/env bash
# Download every wheel the images need into ./wheels, so `docker build` can install offline.
#
# Why: registries may be unreachable from inside a build (air-gapped CI, a TLS-intercepting proxy whose CA the
# base image does not trust), while the host's pip works. The Dockerfile installs with
# `--no-index --find-links` when ./wheels holds wheels, and from PyPI when it does not.
#
# Usage: deploy/build_wheelhouse.sh [EXTRAS]     EXTRAS: comma-separated, default "serve,pg,train".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-serve,pg,train}"
python="${PYTHON:-python3}"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT

"$python" deploy/requirements_from_pyproject.py "$extras" --with-build-system > "$requirements"
echo "pip" >> "$requirements"
mkdir -p wheels
echo "wheelhouse: downloading $(wc -l < "$requirements") requirements (extras: $extras) into wheels/"
# Binary wheels only: the slim image has no compiler, and the host and image share platform and Python 3.11.
"$python" -m pip download --quiet --only-binary=:all: --dest wheels -r "$requirements" 2> >(grep -v "is ignored: it is neither" >&2)
echo "wheelhouse: $(find wheels -name '*.whl' | wc -l) wheels, $(du -sh wheels | cut -f1)"
