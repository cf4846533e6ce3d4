#!/usr/bin/env bash
# A throw-away PostgreSQL server for the team-tracking tests (tests/test_team_tracking.py).
#
#   eval "$(bash scripts/test_postgres.sh start)"   # prints: export RESCALELAB_TEST_POSTGRES_URI=...
#   bash scripts/test_postgres.sh stop
#
# start: installs Debian's `postgresql` package when no server binaries are found (as root, with
# apt-get), creates a cluster in $RESCALELAB_PG_DIR (default /tmp/rescalelab-pg-$UID) owned by the
# `postgres` user when run as root (PostgreSQL refuses to run as root), starts it on 127.0.0.1
# port $RESCALELAB_PG_PORT (default 55432; a plain host:port URI, as a team server would use),
# and gives the tests a fresh, empty database.
# Run twice, it reuses the running server and recreates the database. When no server can be had
# (no apt-get, no root) it says why on stderr and prints nothing: the tests then skip.
set -euo pipefail

dir="${RESCALELAB_PG_DIR:-/tmp/rescalelab-pg-$(id -u)}"
db="${RESCALELAB_PG_DB:-rescalelab_test}"
data="$dir/data"
sock="$dir/sock"
log="$dir/server.log"
port="${RESCALELAB_PG_PORT:-55432}"

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
say() { echo "test_postgres: $*" >&2; }

# Run a server command as the cluster's owner: `postgres` when we are root, else ourselves.
as_owner() {
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local bin
  bin="$(bindir)"
  if [[ -z "$bin" ]]; then
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
      say "no PostgreSQL server binaries and cannot apt-get install postgresql: tests will skip"
      return 0
    fi
    say "installing Debian's postgresql package"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }
    bin="$(bindir)"
  fi
  mkdir -p "$dir" "$sock"
  [[ "$(id -u)" == 0 ]] && chown -R postgres: "$dir"
  if [[ ! -f "$data/PG_VERSION" ]]; then
    as_owner "$bin/initdb" -D "$data" --auth=trust --username=postgres -E UTF8 >/dev/null
  fi
  if ! as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    # Loopback only. fsync off: a test database need not survive a crash.
    as_owner "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 -o "-c listen_addresses=127.0.0.1 \
      -p $port -c unix_socket_directories='$sock' -c fsync=off" start >/dev/null
  fi
  PGOPTIONS="-c client_min_messages=warning" as_owner "$bin/psql" -h "$sock" -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
    -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  echo "export RESCALELAB_TEST_POSTGRES_URI='postgresql://postgres@127.0.0.1:$port/$db'"
}

stop() {
  local bin
  bin="$(bindir)"
  [[ -n "$bin" && -f "$data/PG_VERSION" ]] || return 0
  as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
