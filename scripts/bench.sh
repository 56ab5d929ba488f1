#!/usr/bin/env bash
# Issue 2's benchmarks (benches/core.rs): starts its own two PostgreSQL
# clusters, measures rowshift next to each reference, prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/pg.sh install
cargo bench --bench core
