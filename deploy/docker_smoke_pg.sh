#!/usr/bin/env bash
# Smoke test of the compose `pg` profile: two service replicas sharing one PostgreSQL + pgvector gallery.
#   replica A + postgres (profile pg) up -> A healthy -> enroll through A -> replica B (second compose project,
#   another port, same store URL) up -> B sees and identifies A's enrollments -> both torn down (volumes removed).
#
# Usage: deploy/docker_smoke_pg.sh
# Environment (optional): IDEMBED_BASE_IMAGE, IDEMBED_PG_IMAGE (default pgvector/pgvector:pg16; without a
# registry build one with deploy/build_local_pgvector.sh), PYTHON (default .venv/bin/python),
# SMOKE_TIMEOUT (seconds to wait for healthy, default 180).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-.venv/bin/python}"
timeout_s="${SMOKE_TIMEOUT:-180}"
project_a="idembed-pg-$$-a"
project_b="idembed-pg-$$-b"
state="$(mktemp)"
started=$(date +%s)
log() { printf '[pg-smoke %4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
die() { log "FAILED: $*"; exit 1; }

docker info > /dev/null 2>&1 || die "no docker engine reachable (DOCKER_HOST=${DOCKER_HOST:-unset})"
if docker compose version > /dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pg_port="$(free_port)"
port_a="$(free_port)"
port_b="$(free_port)"
password="pg-smoke-$$-$(date +%s)"
export IDEMBED_API_KEYS="pg-smoke-key-$$" IDEMBED_HOST=127.0.0.1 IDEMBED_IMAGE="idembed:smoke"
export IDEMBED_PG_PORT="$pg_port" IDEMBED_PG_PASSWORD="$password"
export IDEMBED_STORE_URL="postgresql://idembed:$password@127.0.0.1:$pg_port/idembed"

cleanup() {
  local status=$?
  IDEMBED_PORT="$port_b" "${compose[@]}" -p "$project_b" down -v > /dev/null 2>&1 || true
  IDEMBED_PORT="$port_a" "${compose[@]}" -p "$project_a" --profile pg down -v > /dev/null 2>&1 || true
  rm -f "$state"
  log "torn down ($project_a, $project_b and their volumes)"
  exit "$status"
}
trap cleanup EXIT

wait_healthy() {  # project port
  local deadline=$(( $(date +%s) + timeout_s )) health cid
  while (( $(date +%s) < deadline )); do
    cid="$(IDEMBED_PORT="$2" "${compose[@]}" -p "$1" ps -q idembed)"
    health="$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid" 2> /dev/null || true)"
    [[ "$health" == healthy ]] && { log "$1: idembed healthy on 127.0.0.1:$2"; return 0; }
    sleep 2
  done
  IDEMBED_PORT="$2" "${compose[@]}" -p "$1" --profile pg logs --tail 40
  die "$1 not healthy after ${timeout_s}s"
}

log "building the service image"
IDEMBED_PORT="$port_a" "${compose[@]}" -p "$project_a" build idembed > /dev/null || die "image build failed"
log "replica A + PostgreSQL ($IDEMBED_PG_IMAGE) on 127.0.0.1:$pg_port"
IDEMBED_PORT="$port_a" "${compose[@]}" -p "$project_a" --profile pg up -d postgres idembed
wait_healthy "$project_a" "$port_a"
"$python" deploy/smoke_client.py exercise --url "http://127.0.0.1:$port_a" --api-key "$IDEMBED_API_KEYS" --state "$state"

log "replica B (own compose project, same store URL) on 127.0.0.1:$port_b"
IDEMBED_PORT="$port_b" "${compose[@]}" -p "$project_b" up -d idembed
wait_healthy "$project_b" "$port_b"
"$python" deploy/smoke_client.py check --url "http://127.0.0.1:$port_b" --api-key "$IDEMBED_API_KEYS" --state "$state"
log "PG SMOKE OK: identities enrolled through A are served by B"
