#!/usr/bin/env bash
# Runs Switchyard locally: a nats-server with JetStream and the example configuration.
# Extra arguments go to `switchyard dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nats-server.sh
ensure_nats_server
exec cargo run --release --locked --bin switchyard -- dev "$@"
