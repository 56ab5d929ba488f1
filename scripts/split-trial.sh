#!/usr/bin/env bash
# The split trial of docs/benchmarks.md (issue 2, session 34): how two
# connections rewriting the same 200,000 neighbouring rows fare by how their
# keys are split between them, with PostgreSQL alone (no replication, no
# rowshift). A throwaway cluster gets a fresh 2M-row table per split; two
# psql sessions then rewrite rows 3..200,002 in 20 statements of 10,000 keys,
# in one transaction each, three times over (the first pass leaves a dead
# version of every row, as the bench's earlier rounds do).
#   bash scripts/split-trial.sh [SIZE...]   runs of SIZE keys from each batch's
#                                           start, dealt in turn (default 64 512 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/pg.sh install
dir=$(mktemp -d /tmp/rowshift-split-trial.XXXXXX)
chmod 755 "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scripts/pg.sh start "$dir/pg" "$port"
trap 'scripts/pg.sh stop "$dir/pg"; rm -rf "$dir"' EXIT
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres)

# One session's statements: part $1 of runs of $2 keys.
statements() {
  echo "SET enable_hashjoin = off; SET enable_mergejoin = off; BEGIN;"
  for b in $(seq 0 19); do
    lo=$((3 + 10000 * b)); hi=$((lo + 9999))
    echo "UPDATE t SET amount_cents = t.amount_cents + 1, customer_id = t.customer_id, state = t.state, note = t.note, total_with_tax = t.total_with_tax, created_at = t.created_at FROM (SELECT g AS id FROM generate_series($lo, $hi) g WHERE ((g - $lo) / $2) % 2 = $1) v WHERE t.id = v.id;"
  done
  echo "COMMIT;"
}

sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(64 512 5000)
for size in "${sizes[@]}"; do
  "${psql[@]}" <<'SQL'
DROP TABLE IF EXISTS t;
CREATE TABLE t (id bigint PRIMARY KEY, customer_id bigint NOT NULL, amount_cents bigint NOT NULL,
  state text NOT NULL, note text, total_with_tax numeric(14,2) NOT NULL, created_at timestamptz NOT NULL)
  WITH (autovacuum_enabled = false);
INSERT INTO t SELECT g, g % 1000, g * 3, 'paid', repeat('x', 120), g * 1.2, now()
  FROM generate_series(1, 2000000) g;
CHECKPOINT;
SQL
  statements 0 "$size" >"$dir/part0.sql"
  statements 1 "$size" >"$dir/part1.sql"
  for pass in 1 2 3; do
    start=$(date +%s.%N)
    "${psql[@]}" -f "$dir/part0.sql" & first=$!
    "${psql[@]}" -f "$dir/part1.sql" & second=$!
    wait "$first"; wait "$second"
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" -v size="$size" -v pass="$pass" \
      'BEGIN { printf "runs of %s keys, pass %s: %.2f s\n", size, pass, e - s }'
    "${psql[@]}" -c CHECKPOINT
  done
done
