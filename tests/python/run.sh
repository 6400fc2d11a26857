#!/usr/bin/env bash
# Start a dev site on free ports, run the Python reflection client against
# it, stop the site. Usage: tests/python/run.sh <path to chipsite binary>
set -euo pipefail
bin="${1:?usage: run.sh <chipsite binary>}"
here="$(cd "$(dirname "$0")" && pwd)"
dir="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
CHIPSITE_ADDRESSES__ADMIN=127.0.0.1:0 CHIPSITE_ADDRESSES__KEY_VAULT=127.0.0.1:0 \
  CHIPSITE_ADDRESSES__TICKET=127.0.0.1:0 CHIPSITE_ADDRESSES__USER_GATEWAY=127.0.0.1:0 \
  CHIPSITE_ADDRESSES__CONSOLE=127.0.0.1:0 CHIPSITE_ADDRESSES__CONSOLE_HTTPS=127.0.0.1:0 \
  CHIPSITE_ADDRESSES__OPS=127.0.0.1:0 "$bin" dev --data-dir "$dir" >"$dir/site.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -f "$dir/endpoints.json" ] && break; sleep 0.1; done
[ -f "$dir/endpoints.json" ] || { cat "$dir/site.log"; echo "dev site did not start"; exit 1; }
python3 "$here/reflection_client.py" --endpoints "$dir/endpoints.json"
