#!/usr/bin/env bash
# Starts and stops throwaway PostgreSQL 15 clusters on 127.0.0.1.
#   scripts/pg.sh install                 apt packages rowshift needs to build and test
#   scripts/pg.sh start DIR PORT [LEVEL]  initdb + start (LEVEL: logical (default) or replica)
#   scripts/pg.sh stop DIR
set -euo pipefail
PGBIN=/usr/lib/postgresql/15/bin

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  install)
    need=()
    [ -x "$PGBIN/initdb" ] || need+=(postgresql)
    dpkg -s libpq-dev >/dev/null 2>&1 || need+=(libpq-dev)
    dpkg -s pkg-config >/dev/null 2>&1 || need+=(pkg-config)
    # pg_query (PostgreSQL's own parser, for `migrate lint`) generates its bindings with libclang.
    dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
    # rdkafka builds its own librdkafka (cmake-build): Debian's is too old.
    command -v cmake >/dev/null 2>&1 || need+=(cmake)
    dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || need+=(libcurl4-openssl-dev)
    dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
    command -v cc >/dev/null 2>&1 || need+=(build-essential)
    if [ ${#need[@]} -gt 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
      # Debian's package starts its own cluster on 5432; rowshift uses throwaway ones.
      (command -v pg_ctlcluster >/dev/null && pg_ctlcluster 15 main stop) >/dev/null 2>&1 || true
    fi
    ;;
  start)
    dir=$(realpath -m "$2"); port=$3; level=${4:-logical}
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_postgres "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
    cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
wal_level = $level
max_replication_slots = 40
max_wal_senders = 40
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
CONF
    as_postgres "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
    ;;
  stop)
    dir=$(realpath -m "$2")
    [ -d "$dir/data" ] && as_postgres "$PGBIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    ;;
  *)
    echo "usage: $0 install | start DIR PORT [logical|replica] | stop DIR" >&2; exit 2 ;;
esac
