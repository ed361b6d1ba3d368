#!/usr/bin/env bash
# Checks docker-compose.yml: with the Docker Compose client, `docker compose config`;
# without it, the file must parse as YAML and every file it mounts or builds must exist.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then
  docker compose config --quiet
  echo "docker-compose.yml: valid (docker compose config)"
  exit 0
fi

python3 - <<'PY'
import os, sys
try:
    import yaml
except ImportError:
    print("docker-compose.yml: not checked (neither docker compose nor PyYAML is installed)")
    sys.exit(0)

with open("docker-compose.yml") as handle:
    compose = yaml.safe_load(handle)
services = compose.get("services") or {}
missing = []
for name in ("nats", "jaeger", "n8n", "switchyard"):
    if name not in services:
        missing.append(f"service {name}")
for name, service in services.items():
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("./") and not os.path.exists(source):
            missing.append(f"{name}: mounted file {source}")
    if "build" in service and not os.path.exists("Dockerfile"):
        missing.append(f"{name}: Dockerfile")
if missing:
    print("docker-compose.yml: invalid: missing " + ", ".join(missing))
    sys.exit(1)
print(f"docker-compose.yml: parses, {len(services)} services, mounted files present")
PY
