#!/bin/sh
# Initialise PGDATA on first start (user, password, database from POSTGRES_*), then exec the command.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
user="${POSTGRES_USER:-postgres}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "error: POSTGRES_PASSWORD must be set to initialise $PGDATA" >&2
    exit 1
  fi
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 > /dev/null
  rm -f "$pwfile"
  # A socket-only server for set-up, so nothing can connect before the database exists.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" -w start > /dev/null
  db="${POSTGRES_DB:-$user}"
  if [ "$db" != postgres ]; then
    createdb -h /var/run/postgresql -U "$user" "$db"
  fi
  psql -h /var/run/postgresql -U "$user" -d "$db" -q -c "CREATE EXTENSION IF NOT EXISTS vector"
  pg_ctl -D "$PGDATA" -m fast -w stop > /dev/null
  echo "initialised $PGDATA: user $user, database $db, pgvector enabled"
fi
if [ "${1:-}" = postgres ]; then
  shift
  exec postgres -c unix_socket_directories=/var/run/postgresql "$@"
fi
exec "$@"
