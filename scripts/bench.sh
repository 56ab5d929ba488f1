#!/usr/bin/env bash
# The benchmarks: `bash scripts/bench.sh` runs all of them, or name one
# (core: issue 2's backfill/apply/lag; cutover: issue 3's verify and write
# pause; migrate: issue 5's validate/status/lint; kafka: issue 4's transport). Each starts its own PostgreSQL clusters, measures rowshift next to
# its reference, and prints a Markdown table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/pg.sh install
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(core cutover migrate kafka)
for b in "${benches[@]}"; do
  cargo bench --bench "$b"
done
