#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests, which start their own nats-server
# (2.10 or newer, installed on first use) and HTTP receivers on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nats-server.sh
ensure_nats_server
echo "using $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"
cargo test --workspace --locked "$@"
