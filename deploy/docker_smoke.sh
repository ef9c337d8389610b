#!/usr/bin/env bash
# End-to-end deployment smoke test with a real docker engine:
#   build the service image -> compose up -> wait for healthy -> verify/identify/enroll through the typed
#   client -> restart the container -> enrolled identities still there -> kill -9 the service process -> the
#   restart policy brings it back, identities still there -> compose down (volumes removed).
#
# Usage: deploy/docker_smoke.sh
# Environment (all optional):
#   IDEMBED_BASE_IMAGE   base image build arg (default python:3.11-slim; e.g. local/python-base:bookworm)
#   IDEMBED_PORT         host port (host networking); default: a free port, so it never clashes
#   PYTHON               python with the project installed, for the client (default .venv/bin/python)
#   SMOKE_KEEP=1         leave the stack running for inspection (then: docker-compose -p NAME down -v)
#   SMOKE_TIMEOUT        seconds to wait for healthy (default 180)
#   SMOKE_TRAIN=1        also build the training image, retrain for 1 epoch with `compose run train` into the
#                        models volume, and hot-reload the service onto the new bundle (minutes more)
# Needs: docker (DOCKER_HOST honoured) and `docker compose` or `docker-compose`. A ./wheels wheelhouse
# (deploy/build_wheelhouse.sh) is used when present, for builds without registry access.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-.venv/bin/python}"
timeout_s="${SMOKE_TIMEOUT:-180}"
project="idembed-smoke-$$"
api_key="smoke-key-$(date +%s)-$$"
state="$(mktemp)"
started=$(date +%s)

log() { printf '[smoke %4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
die() { log "FAILED: $*"; exit 1; }

docker info > /dev/null 2>&1 || die "no docker engine reachable (DOCKER_HOST=${DOCKER_HOST:-unset})"
if docker compose version > /dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose > /dev/null; then
  compose=(docker-compose)
else
  die "neither 'docker compose' nor 'docker-compose' is installed"
fi
[[ -x "$python" ]] || die "PYTHON=$python is not executable (create .venv, see README)"
[[ -f models/default/manifest.json ]] || die "models/default has no bundle to bake into the image"

port="${IDEMBED_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export IDEMBED_PORT="$port" IDEMBED_API_KEYS="$api_key" IDEMBED_HOST=127.0.0.1
export IDEMBED_IMAGE="idembed:smoke"
dc() { "${compose[@]}" -p "$project" "$@"; }

cleanup() {
  local status=$?
  if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then
    log "SMOKE_KEEP=1: stack left running as project $project on 127.0.0.1:$port"
  else
    dc down -v --remove-orphans > /dev/null 2>&1 || true
    log "torn down (containers and volumes of $project removed)"
  fi
  rm -f "$state"
  exit "$status"
}
trap cleanup EXIT

container_id() { dc ps -q idembed; }

wait_healthy() {
  local deadline=$(( $(date +%s) + timeout_s )) health cid
  while (( $(date +%s) < deadline )); do
    cid="$(container_id)"
    health="$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$cid" 2> /dev/null || echo missing)"
    case "$health" in
      healthy) log "container ${cid:0:12} healthy"; return 0 ;;
      unhealthy) dc logs --tail 50 idembed; die "container became unhealthy" ;;
    esac
    sleep 2
  done
  dc logs --tail 50 idembed
  die "not healthy after ${timeout_s}s (last status: $health)"
}

log "building image (base ${IDEMBED_BASE_IMAGE:-python:3.11-slim}, wheelhouse: $([[ -d wheels ]] && echo yes || echo no))"
dc build idembed > "${TMPDIR:-/tmp}/$project-build.log" 2>&1 || { tail -30 "${TMPDIR:-/tmp}/$project-build.log"; die "image build failed"; }
rm -f "${TMPDIR:-/tmp}/$project-build.log"
log "image $(docker image inspect --format '{{.Id}}' "$IDEMBED_IMAGE" | cut -c8-19), $(( $(docker image inspect --format '{{.Size}}' "$IDEMBED_IMAGE") / 1000000 )) MB"
[[ "$(docker run --rm --entrypoint id "$IDEMBED_IMAGE" -u)" != 0 ]] || die "image runs as root"
docker run --rm --entrypoint python "$IDEMBED_IMAGE" -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is not None)" \
  || die "TensorFlow is installed in the service image"
log "image runs as non-root and has no TensorFlow"

dc up -d idembed
wait_healthy
log "client: verify, identify, enroll"
"$python" deploy/smoke_client.py exercise --url "http://127.0.0.1:$port" --api-key "$api_key" --state "$state"

log "restarting the container"
dc restart idembed > /dev/null
wait_healthy
log "client: identities after restart"
"$python" deploy/smoke_client.py check --url "http://127.0.0.1:$port" --api-key "$api_key" --state "$state" --keep

# A crash rather than a stop: SIGKILL to the service process (PID 1 of the container, by its host PID). The
# restart policy must bring it back, with the enrolled identities.
cid="$(container_id)"
restarts_before="$(docker inspect --format '{{.RestartCount}}' "$cid")"
pid="$(docker inspect --format '{{.State.Pid}}' "$cid")"
[[ "$pid" =~ ^[1-9][0-9]*$ ]] || die "no host PID for container $cid"
log "crash: kill -9 of the service process (host PID $pid)"
kill -9 "$pid"
deadline=$(( $(date +%s) + timeout_s ))
until (( $(docker inspect --format '{{.RestartCount}}' "$cid") > restarts_before )); do
  (( $(date +%s) < deadline )) || die "restart policy did not restart the container after kill -9"
  sleep 1
done
log "restart policy restarted the container (RestartCount $(docker inspect --format '{{.RestartCount}}' "$cid"))"
wait_healthy
log "client: identities after the crash"
"$python" deploy/smoke_client.py check --url "http://127.0.0.1:$port" --api-key "$api_key" --state "$state"

if [[ "${SMOKE_TRAIN:-0}" == 1 ]]; then
  export IDEMBED_TRAIN_IMAGE="idembed-train:smoke"
  log "building the training image"
  dc --profile train build train > "${TMPDIR:-/tmp}/$project-train-build.log" 2>&1 \
    || { tail -30 "${TMPDIR:-/tmp}/$project-train-build.log"; die "training image build failed"; }
  rm -f "${TMPDIR:-/tmp}/$project-train-build.log"
  log "retraining (1 epoch) into the models volume with 'compose run train'"
  dc --profile train run --rm train build-bundle --out models/smoke-retrained --work runs/smoke \
    --epochs 1 --folds 2 --max-genuine 2000 --max-impostor 5000 --pca-components 0 --version smoke 2>&1 \
    | grep -E "^bundle|EER" || die "training run failed"
  log "client: hot reload onto the retrained bundle"
  "$python" deploy/smoke_client.py reload --url "http://127.0.0.1:$port" --api-key "$api_key" --bundle smoke-retrained
fi

log "SMOKE OK"
