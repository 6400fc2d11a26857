#!/usr/bin/env bash
# The two-site compose stack, end to end, on a real Docker engine: compose's
# own config check, the images built offline (deploy/images.sh offline), both
# sites up with every healthcheck passing, then driven from outside as an
# operator and two apps would: a user on each site, an app enrolled on each,
# a link and a tally between the two users across the sites; then site A's
# containers (its PostgreSQL too) stopped and started again, and the data,
# the unsealed key and the tally still there and still working.
#
#   tests/compose/run.sh <dir holding chipsite, chipsctl and chipapp>
set -euo pipefail
bin="$(cd "${1:?usage: run.sh <dir with chipsite, chipsctl, chipapp>}" && pwd)"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export COMPOSE_PROJECT_NAME=chipsite-ci
export CHIPSITE_IMAGE=chipsite:ci
export CHIPSITE_POSTGRES_IMAGE="${CHIPSITE_POSTGRES_IMAGE:-chipsite-postgres:offline}"
CHIPSITE_SECRETS="$(mktemp -d)"
export CHIPSITE_SECRETS
export CHIPSCTL="$bin/chipsctl"
app="$bin/chipapp"
apps="$(mktemp -d)"
mkdir -p "$apps/a" "$apps/b"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
compose() { "${COMPOSE[@]}" "$@"; }
# Debian's engine (20.10) can deadlock when containers attached to several
# networks exit at once (libnetwork's releaseNetwork): those are stopped one
# at a time first, and every teardown is bounded.
calm_stop() {
  local c
  for c in "$@"; do timeout 60 "${COMPOSE[@]}" stop "$c" >/dev/null 2>&1 || true; done
}
ok=0
finish() {
  if [ "$ok" != 1 ]; then
    timeout 30 "${COMPOSE[@]}" ps -a >&2 || true
    timeout 30 "${COMPOSE[@]}" logs --tail 40 >&2 || true
  fi
  calm_stop otel-collector a-peer-gateway b-peer-gateway
  timeout 120 "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || echo "teardown did not finish" >&2
  rm -rf "$CHIPSITE_SECRETS" "$apps"
}
trap finish EXIT
started=$SECONDS
step() { printf '\n--> %s (%ds so far)\n' "$*" "$((SECONDS - started))"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
ctl() { "$root/deploy/compose.sh" chipsctl "$@"; }
# Run until it succeeds, or fail after $1 seconds (no fixed sleeps).
retry() {
  local within="$1"; shift
  local deadline=$((SECONDS + within))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# Leftovers of an interrupted run (an engine killed mid-run may keep
# networks of the project that it can no longer attach to).
timeout 120 "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" |
  xargs -r docker network rm >/dev/null 2>&1 || true

step "compose config"
compose config -q
compose --profile otel --profile tools config -q
# The stack's published ports are on 127.0.0.1 only.
if compose config | grep -E '^\s+host_ip:' | grep -qv '127.0.0.1'; then fail "a port published beyond loopback"; fi
[ "$(compose config | grep -c 'host_ip: 127.0.0.1')" -ge 10 ] || fail "published ports not all on loopback"

step "images, offline"
CHIPSITE_BIN_DIR="$bin" deploy/images.sh offline --tag "$CHIPSITE_IMAGE"
# The collector's profile, with a stand-in for the collector image (none can
# be pulled here): every service's traces must reach it.
standin=chipsite-otel-standin:offline
if ! docker image inspect chipsite-otel-standin-rootfs:bookworm >/dev/null 2>&1; then
  tar="$(mktemp --suffix=.tar)"
  mmdebstrap --quiet --variant=minbase --include=python3-grpcio --mode=root \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm "$tar" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  docker import "$tar" chipsite-otel-standin-rootfs:bookworm >/dev/null
  rm -f "$tar"
fi
DOCKER_BUILDKIT=0 docker build -q -t "$standin" tests/compose/otel-standin >/dev/null
export OTEL_COLLECTOR_IMAGE="$standin" CHIPSITE_OTLP_ENDPOINT=http://otel-collector:4317 COMPOSE_PROFILES=otel

step "both sites up and healthy"
deploy/compose.sh up

step "every chipsite container: uid 10001, read-only root, no capabilities, loopback ports"
for c in $(compose ps -q); do
  name="$(docker inspect -f '{{.Name}}' "$c")"
  case "$name" in *postgres* | *otel-collector*) continue ;; esac
  [ "$(docker inspect -f '{{.Config.User}}' "$c")" = "10001:10001" ] || fail "$name runs as $(docker inspect -f '{{.Config.User}}' "$c")"
  [ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$c")" = true ] || fail "$name has a writable root"
  docker inspect -f '{{.HostConfig.CapDrop}}' "$c" | grep -q ALL || fail "$name keeps capabilities"
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" = healthy ] || fail "$name is not healthy"
  if docker inspect -f '{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{.HostIp}} {{end}}{{end}}' "$c" | grep -qv '^\(127.0.0.1 \)*$'; then
    fail "$name publishes beyond loopback"
  fi
done

step "a user on each site, an app enrolled on each"
ctl a user create alice --name Alice >/dev/null
ctl b user create bob --name Bob >/dev/null
ticket() { ctl "$1" ticket issue "$2" | grep -o 'chipsite:user?[^ ]*'; }
(cd "$apps/a" && "$app" enroll "$(ticket a alice)" --chip-id alice)
(cd "$apps/b" && "$app" enroll "$(ticket b bob)" --chip-id bob)

step "a link and a tally between alice (site A) and bob (site B)"
linked="$(cd "$apps/b" && "$app" tally-redeem "$(cd "$apps/a" && "$app" tally-ticket)")"
[ "$(echo "$linked" | json 'd["linked"]["chip_id"]')" = alice ] || fail "no link: $linked"
pin_b="$(ctl b key status | grep -o 'sha256//[^ ]*')"
offer="$(cd "$apps/a" && "$app" tally-offer bob "$pin_b" --terms '{"limit":1000}')"
tally="$(echo "$offer" | json 'd["id"]')"
state() { (cd "$apps/$1" && "$app" tallies) | json "[t['state'] for t in d['tallies'] if t['id']=='$tally'][0] if any(t['id']=='$tally' for t in d['tallies']) else ''"; }
is() { [ "$(state "$1")" = "$2" ]; }
retry 30 is b offered || fail "bob never saw the offer"
(cd "$apps/b" && "$app" tally-accept "$tally" >/dev/null)
retry 30 is a open || fail "the tally never opened on site A"
is b open || fail "the tally is not open on site B"
pin_a="$(ctl a key status | grep -o 'sha256//[^ ]*')"

step "site A stopped and started again (its PostgreSQL too)"
site_a="$(compose config --services | grep '^a-' | grep -v '^a-ctl$' | tr '\n' ' ')"
calm_stop a-peer-gateway
# shellcheck disable=SC2086
compose stop $site_a
# shellcheck disable=SC2086
compose start $site_a
compose up -d --wait

step "the data survived: users, the unsealed key, the peer server, the app's key, the tally"
ctl a user list | grep -q alice || fail "alice is gone"
[ "$(ctl a key status | grep -o 'sha256//[^ ]*')" = "$pin_a" ] || fail "site A's key changed"
ctl a key status | grep -q unsealed || fail "site A's key is sealed after a restart"
ctl a peer status | grep -q running || fail "site A's peer server is not running"
retry 30 bash -c "cd '$apps/a' && '$app' status >/dev/null" || fail "alice's app has no session after the restart"
is a open || fail "the tally is not open on site A after the restart"
(cd "$apps/a" && "$app" tally-close "$tally" >/dev/null)
retry 60 is b closed || fail "the close never reached site B"

step "every service's traces reached the collector (profile otel)"
# The console has served nothing yet: its sign-in page, from outside.
python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:44303/signin', timeout=10).read()"
traced() {
  local logs
  logs="$(compose logs --no-log-prefix otel-collector 2>/dev/null)"
  for service in admin key-vault ticket tally peer-gateway user-gateway console; do
    grep -q "service.name=$service\$" <<<"$logs" || return 1
  done
}
retry 60 traced || { compose logs --no-log-prefix otel-collector >&2; fail "traces missing"; }
compose logs --no-log-prefix otel-collector | grep 'service.name=' | sort

ok=1
step "passed"
