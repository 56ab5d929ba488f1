#!/usr/bin/env bash
# The demo: a throwaway local PostgreSQL with logical replication, an
# `orders` table of 100,000 rows, a write load (pgbench), and
# pipelines/orders_v2.yaml rewriting the table while the load runs. Shows
# progress until the new table is in sync, proves it with a full comparison,
# verifies it with chunked checksums, cuts over (the new table takes the name
# `orders` under a write pause of milliseconds), writes through the new
# table, rolls back (the reverse stream carried the write to the old table),
# then removes everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/pg.sh install
command -v cargo >/dev/null || { echo "cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/rowshift

work=$(mktemp -d /tmp/rowshift-demo.XXXXXX); chmod 755 "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
load_pid=
run_pid=
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null || true
  scripts/pg.sh stop "$work/pg"; rm -rf "$work"
}
trap cleanup EXIT
echo "== starting a throwaway PostgreSQL on 127.0.0.1:$port (wal_level = logical)"
scripts/pg.sh start "$work/pg" "$port" logical
export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres
createdb demo
export ROWSHIFT_SOURCE_DSN="host=127.0.0.1 port=$port user=postgres dbname=demo"
echo "== creating public.orders with 100,000 rows"
psql -q -d demo <<'SQL'
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, amount numeric(12,2) NOT NULL,
  status text NOT NULL, note text, legacy_flag boolean, created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO orders (customer_id, amount, status, note, legacy_flag)
SELECT (random() * 1000)::int, round((random() * 500)::numeric, 2), (ARRAY['new', 'paid', 'shipped'])[1 + (random() * 2)::int],
       'note ' || g, g % 2 = 0
FROM generate_series(1, 100000) g;
ANALYZE orders;
SQL
echo "== rowshift plan pipelines/orders_v2.yaml"
$bin plan pipelines/orders_v2.yaml
echo "== write load: pgbench, 200 transactions/s of update + insert + delete"
pgbench -n -d demo -f scripts/demo/load.sql -R 200 -T 600 -c 2 >"$work/pgbench.log" 2>&1 &
load_pid=$!
echo "== rowshift run (backfill while streaming, until caught up)"
$bin run pipelines/orders_v2.yaml --exit-when-caught-up
$bin status orders_v2
echo "== stopping the load; streaming the last changes"
kill "$load_pid"; wait "$load_pid" 2>/dev/null || true; load_pid=
$bin run pipelines/orders_v2.yaml --exit-when-caught-up 2>/dev/null
echo "== full comparison of every row (mapped source vs target)"
diff=$(psql -d demo -tA <<'SQL'
WITH src AS (SELECT id, customer_id, round(amount * 100)::bigint, status, note, round(amount * 1.2, 2), created_at FROM orders)
SELECT (SELECT count(*) FROM (SELECT * FROM src EXCEPT ALL SELECT * FROM orders_v2) a)
     + (SELECT count(*) FROM (SELECT * FROM orders_v2 EXCEPT ALL SELECT * FROM src) b);
SQL
)
rows=$(psql -d demo -tA -c "SELECT count(*) FROM orders_v2")
$bin status orders_v2
if [ "$diff" = 0 ]; then echo "== in sync: orders_v2 has $rows rows, identical to the mapped orders table"; else echo "== MISMATCH: $diff rows differ"; exit 1; fi

echo "== rowshift run in the background (streaming), then verify"
$bin run pipelines/orders_v2.yaml 2>"$work/run.log" &
run_pid=$!
until psql -d demo -tA -c "SELECT applied_at > now() - interval '2 s' FROM rowshift.pipelines" | grep -q t; do sleep 0.5; done
$bin verify orders_v2
echo "== rowshift cutover orders_v2"
$bin cutover orders_v2
psql -d demo -c '\d orders' | head -12
echo "== a write through the name orders now lands in the new table"
psql -d demo -c "UPDATE orders SET amount_cents = amount_cents + 100 WHERE id <= 3 RETURNING id, amount_cents"
sleep 2
echo "== rowshift rollback orders_v2 (the reverse stream kept the old table current)"
$bin rollback orders_v2
psql -d demo -c "SELECT id, amount FROM orders WHERE id <= 3 ORDER BY id"
$bin status orders_v2
kill "$run_pid"; wait "$run_pid" 2>/dev/null || true; run_pid=
$bin abort orders_v2
