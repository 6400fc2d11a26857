#!/usr/bin/env bash
# Build chipsite's container images with a local Docker engine.
#
#   deploy/images.sh chipsite [--base IMAGE] [--tag TAG] [--debug]
#       cargo-builds chipsite and chipsctl on this machine (release; --debug
#       for a quicker, larger build) and copies only the two binaries into
#       the image, FROM --base (default: the Dockerfile's public base,
#       gcr.io/distroless/cc-debian12:nonroot). CHIPSITE_BIN_DIR=DIR takes
#       binaries already built there instead of running cargo.
#   deploy/images.sh offline-base [--tag TAG]
#       a base with no registry: the C runtime the binaries link (Debian's
#       libc6 and libgcc-s1 packages, unpacked), as chipsite-base:debian.
#   deploy/images.sh offline-postgres
#       PostgreSQL 15 from Debian's packages (mmdebstrap, docker import) with
#       an entrypoint that reads the official image's variables, as
#       chipsite-postgres:offline (for CHIPSITE_POSTGRES_IMAGE).
#   deploy/images.sh offline
#       all three, offline: what .ci/run's compose test does.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

say() { printf '%s\n' "$*" >&2; }

build_chipsite() {
  local base="" tag="chipsite:dev" profile=release
  while [ $# -gt 0 ]; do
    case "$1" in
      --base) base="$2"; shift 2 ;;
      --tag) tag="$2"; shift 2 ;;
      --debug) profile=debug; shift ;;
      *) say "unknown option $1"; exit 2 ;;
    esac
  done
  local bin="${CHIPSITE_BIN_DIR:-}"
  if [ -z "$bin" ]; then
    local flags=(--release)
    [ "$profile" = debug ] && flags=()
    (cd "$root" && cargo build "${flags[@]}" -p chipsite -p chipsctl)
    bin="${CARGO_TARGET_DIR:-$root/target}/$profile"
  fi
  local ctx
  ctx="$(mktemp -d)"
  trap 'rm -rf "$ctx"' RETURN
  for b in chipsite chipsctl; do
    [ -x "$bin/$b" ] || { say "$bin/$b: not built"; exit 1; }
    # Symbols and debug info stay out of the image.
    strip -o "$ctx/$b" "$bin/$b" 2>/dev/null || cp "$bin/$b" "$ctx/$b"
  done
  cp "$here/Dockerfile" "$ctx/"
  local args=()
  [ -n "$base" ] && args+=(--build-arg "BASE=$base")
  DOCKER_BUILDKIT=0 docker build -q "${args[@]}" -t "$tag" "$ctx" >/dev/null
  say "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}'))"
}

build_offline_base() {
  local tag="chipsite-base:debian"
  [ "${1:-}" = --tag ] && tag="$2"
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  mkdir -p "$work/debs" "$work/root"
  (cd "$work/debs" && apt-get download libc6 libgcc-s1 >/dev/null 2>&1)
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
  # Only what a binary needs at run time: the loader and the libraries.
  rm -rf "$work/root/usr/share" "$work/root/usr/libexec" "$work/root/usr/bin" "$work/root/usr/sbin" "$work/root/sbin" "$work/root/etc/ld.so.conf.d" "$work/root/usr/lib/x86_64-linux-gnu/gconv" 2>/dev/null || true
  mkdir -p "$work/root/tmp" "$work/root/etc"
  chmod 1777 "$work/root/tmp"
  printf 'root:x:0:0::/root:/nonexistent\nnonroot:x:10001:10001::/tmp:/nonexistent\n' > "$work/root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:10001:\n' > "$work/root/etc/group"
  tar -C "$work/root" -c . | docker import - "$tag" >/dev/null
  say "built $tag from Debian's libc6 and libgcc-s1 ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}'))"
}

build_offline_postgres() {
  local rootfs="chipsite-postgres-rootfs:bookworm"
  if ! docker image inspect "$rootfs" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || { say "needs mmdebstrap (apt-get install mmdebstrap)"; exit 1; }
    local tar
    tar="$(mktemp --suffix=.tar)"
    trap 'rm -f "$tar"' RETURN
    mmdebstrap --quiet --variant=minbase --include=postgresql-15 --mode=root \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -rf "$1"/var/lib/postgresql/15 "$1"/etc/postgresql/15 "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
      bookworm "$tar" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    docker import "$tar" "$rootfs" >/dev/null
  fi
  DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$rootfs" -t chipsite-postgres:offline "$here/postgres-offline" >/dev/null
  say "built chipsite-postgres:offline (FROM $rootfs, Debian's postgresql-15)"
}

case "${1:-}" in
  chipsite) shift; build_chipsite "$@" ;;
  offline-base) shift; build_offline_base "$@" ;;
  offline-postgres) shift; build_offline_postgres ;;
  offline)
    shift
    build_offline_base
    build_offline_postgres
    build_chipsite --base chipsite-base:debian "$@"
    ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
