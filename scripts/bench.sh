#!/usr/bin/env bash
# Benchmarks Switchyard against bare JetStream baselines on this machine and prints a
# markdown table. Everything runs on 127.0.0.1: the benchmark starts its own nats-server
# (2.10 or newer, installed on first use), the release router and an HTTP receiver.
# Extra arguments go to switchyard-bench, e.g. --events 50000 --rate 2000 --duration 20.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nats-server.sh
ensure_nats_server
echo "using $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))" >&2
cargo build --release --locked --bin switchyard --bin switchyard-bench >&2
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/switchyard-bench" \
  --switchyard-bin "$target_dir/release/switchyard" \
  --nats-server "$NATS_SERVER_BIN" \
  --schemas schemas \
  "$@"
