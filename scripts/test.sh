#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian), starts two throwaway
# PostgreSQL 15 clusters on 127.0.0.1 (wal_level logical and replica) and two
# Kafka-protocol brokers (tansu, noida-db), runs
# lint and every test, and stops the clusters it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/pg.sh install
scripts/kafka.sh install

work=$(mktemp -d /tmp/rowshift-test.XXXXXX)
chmod 755 "$work"
cleanup() {
  scripts/kafka.sh stop "$work/tansu"
  scripts/kafka.sh stop "$work/noida"
  scripts/pg.sh stop "$work/logical"
  scripts/pg.sh stop "$work/replica"
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export ROWSHIFT_TEST_PG_PORT=$(free_port)
export ROWSHIFT_TEST_PG_REPLICA_PORT=$(free_port)
scripts/pg.sh start "$work/logical" "$ROWSHIFT_TEST_PG_PORT" logical
scripts/pg.sh start "$work/replica" "$ROWSHIFT_TEST_PG_REPLICA_PORT" replica
tansu_port=$(free_port); noida_port=$(free_port)
scripts/kafka.sh start tansu "$work/tansu" "$tansu_port"
scripts/kafka.sh start noida "$work/noida" "$noida_port"
export ROWSHIFT_TEST_KAFKA_TANSU="127.0.0.1:$tansu_port"
export ROWSHIFT_TEST_KAFKA_NOIDA="127.0.0.1:$noida_port"
export ROWSHIFT_TEST_PYTHON="$PWD/target/py/bin/python"

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet -- --test-threads 4
