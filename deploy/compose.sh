#!/usr/bin/env bash
# The two-site compose stack (docker-compose.yml at the top of the repo).
#
#   deploy/compose.sh up       images if missing, secrets if missing, both
#                              sites up and healthy, then each site set up
#                              (its addresses in the site configuration, its
#                              peer server started)
#   deploy/compose.sh secrets  only the secret files, in $CHIPSITE_SECRETS
#                              (default ./.compose-secrets): per site the
#                              internal PKI (`chipsite pki init`), the site
#                              key pass phrase, the PostgreSQL password and
#                              the database URL
#   deploy/compose.sh chipsctl a|b ARGS…   chipsctl on this machine, for a site
#                              ($CHIPSCTL, else chipsctl on the PATH, else cargo run)
#   deploy/compose.sh down [-v]            stop (-v: and drop the databases)
#
# Uses `docker compose` (or `docker-compose`). Containers run as
# $CHIPSITE_UID:$CHIPSITE_GID: your own uid when you are not root (so you
# and they can read the secret files), 10001 when you are.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CHIPSITE_SECRETS="${CHIPSITE_SECRETS:-./.compose-secrets}"
export CHIPSITE_IMAGE="${CHIPSITE_IMAGE:-chipsite:dev}"
if [ "$(id -u)" = 0 ]; then
  export CHIPSITE_UID="${CHIPSITE_UID:-10001}" CHIPSITE_GID="${CHIPSITE_GID:-10001}"
else
  export CHIPSITE_UID="${CHIPSITE_UID:-$(id -u)}" CHIPSITE_GID="${CHIPSITE_GID:-$(id -g)}"
fi
if docker compose version >/dev/null 2>&1; then
  compose() { docker compose "$@"; }
else
  compose() { docker-compose "$@"; }
fi

random() { head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; }

secrets() {
  for site in a b; do
    local dir="$CHIPSITE_SECRETS/$site"
    mkdir -p "$dir"
    chmod 0700 "$dir"
    if [ "$(id -u)" = 0 ]; then chown "$CHIPSITE_UID:$CHIPSITE_GID" "$dir"; fi
    if [ ! -e "$dir/pki/ca.pem" ]; then
      # The image's own `chipsite pki init`, as the containers' user.
      docker run --rm --read-only --user "$CHIPSITE_UID:$CHIPSITE_GID" \
        -v "$(cd "$dir" && pwd):/out" "$CHIPSITE_IMAGE" \
        pki init /out/pki --site-name "site-$site" >/dev/null
    fi
    (
      umask 077
      [ -s "$dir/site-key.passphrase" ] || random > "$dir/site-key.passphrase"
      [ -s "$dir/postgres.password" ] || random > "$dir/postgres.password"
      [ -s "$dir/database.url" ] ||
        printf 'postgres://chipsite:%s@%s-postgres:5432/chipsite\n' "$(cat "$dir/postgres.password")" "$site" > "$dir/database.url"
    )
    if [ "$(id -u)" = 0 ]; then chown -R "$CHIPSITE_UID:$CHIPSITE_GID" "$dir"; fi
  done
  echo "secrets in $CHIPSITE_SECRETS (keep them; the CA key is in <site>/pki/ca/)" >&2
}

# Each site's own addresses, told to its admin, and its peer server started
# (which needs the pass phrase). Safe to repeat.
setup() {
  for site in a b; do
    local off=0 name="site-a"
    if [ "$site" = b ]; then off=100; name="site-b"; fi
    compose run --rm --no-deps "$site-ctl" --operator compose-setup config set \
      "site.name=$name" \
      user_gateway.host=127.0.0.1 "user_gateway.port=$((44301 + off))" \
      "peer_gateway.host=$site-peer-gateway" peer_gateway.port=44302 \
      "console.url=http://127.0.0.1:$((44303 + off))" >/dev/null ||
      { echo "could not set up site $site" >&2; exit 1; }
    compose run --rm --no-deps "$site-ctl" --operator compose-setup peer start \
      --passphrase-file "/run/secrets/${site}_passphrase" >/dev/null ||
      { echo "could not start site $site's peer server" >&2; exit 1; }
  done
}

case "${1:-}" in
  secrets) secrets ;;
  up)
    shift
    docker image inspect "$CHIPSITE_IMAGE" >/dev/null 2>&1 || deploy/images.sh chipsite --tag "$CHIPSITE_IMAGE"
    secrets
    # `up --wait` has been seen to return 0 with containers left "created":
    # every container must be running.
    if ! compose up -d --wait "$@" || compose ps -a --format '{{.Service}} {{.State}}' | grep -qv ' running$'; then
      compose ps -a >&2
      echo "the stack did not come up healthy: see \`docker compose logs\`" >&2
      exit 1
    fi
    setup
    cat >&2 <<EOT
two sites are up:
  site A: apps 127.0.0.1:44301, peers 127.0.0.1:44302, console http://127.0.0.1:44303, admin 127.0.0.1:44310
  site B: apps 127.0.0.1:44401, peers 127.0.0.1:44402, console http://127.0.0.1:44403, admin 127.0.0.1:44410
  deploy/compose.sh chipsctl a user create alice --name Alice
  docker compose run --rm a-ctl console link      # (the same, in a container)
EOT
    ;;
  chipsctl)
    site="${2:?a or b}"
    shift 2
    off=0
    [ "$site" = b ] && off=100
    pki="$CHIPSITE_SECRETS/$site/pki"
    # $CHIPSCTL, else chipsctl on the PATH, else built from this checkout
    # (a shell alias is not seen here).
    if [ -n "${CHIPSCTL:-}" ]; then
      ctl=("$CHIPSCTL")
    elif command -v chipsctl >/dev/null; then
      ctl=(chipsctl)
    else
      ctl=(cargo run -q -p chipsctl --)
    fi
    exec "${ctl[@]}" --admin "127.0.0.1:$((44310 + off))" \
      --cert "$pki/admin-client.pem" --key "$pki/admin-client.key" --ca "$pki/ca.pem" "$@"
    ;;
  down) shift; compose down "$@" ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
