#!/bin/sh
# The offline test image's entrypoint: what the official postgres image's
# does for the variables the compose file uses (POSTGRES_USER,
# POSTGRES_PASSWORD_FILE, POSTGRES_DB, PGDATA), then postgres itself.
set -eu
bin=/usr/lib/postgresql/15/bin
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
# A first start that stopped half-way is done again from the beginning.
if [ ! -e "$PGDATA/.initialized" ]; then
  find "$PGDATA" -mindepth 1 -delete
  pw="$(mktemp)"
  trap 'rm -f "$pw"' EXIT
  if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then cat "$POSTGRES_PASSWORD_FILE" > "$pw"; else printf '%s' "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD_FILE}" > "$pw"; fi
  "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
  if [ "$POSTGRES_DB" != postgres ]; then
    "$bin/psql" -v ON_ERROR_STOP=1 -h /tmp -U "$POSTGRES_USER" -d postgres -q -c "CREATE DATABASE \"$POSTGRES_DB\""
  fi
  "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  touch "$PGDATA/.initialized"
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
