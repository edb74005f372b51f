# shellcheck shell=bash
# Helpers shared by the tests/bundle checks. Source it; do not run it.
#
# Every check prints exactly one line per result, which tests/bundle/run counts:
#   PASS: <name>
#   FAIL: <name>: <why>
#   *** SKIP: <name>: <why> ***
# A component that cannot be installed or started is a SKIP, except when
# CI=true, where it is a FAIL (as scripts/test does for the S3 server), unless
# the caller says the skip is allowed in CI (only the Docker engine, which
# needs privileges a sandbox may not grant).

bundle_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bundle_dir="$bundle_root/tests/bundle"
bundle_cache=${ROOST_BUNDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/roost-bundle}
# Set to 1 by fail(); each check script exits with it.
export bundle_failed=0

pass() { echo "PASS: $1"; }
fail() {
  echo "FAIL: $1: $2"
  bundle_failed=1
}
skip() { echo "*** SKIP: $1: $2 ***"; }

# unavailable NAME WHY: a component could not be installed or started.
unavailable() {
  if [ "${CI:-}" = "true" ]; then
    fail "$1" "$2 (CI=true: a missing component is a failure)"
  else
    skip "$1" "$2"
  fi
}

# check NAME CMD...: PASS when CMD exits 0, else FAIL with its last lines.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    pass "$name"
  else
    fail "$name" "$(printf '%s\n' "$out" | tail -n 15)"
  fi
}

# The private venv with the pinned tools of requirements.txt (Caddy, Compose,
# websockets, PyYAML, hadolint). Prints nothing; returns non-zero when pip fails.
bundle_venv="$bundle_cache/venv"
ensure_venv() {
  local stamp="$bundle_venv/.requirements"
  if [ -f "$stamp" ] && cmp -s "$stamp" "$bundle_dir/requirements.txt"; then
    return 0
  fi
  mkdir -p "$bundle_cache"
  python3 -m venv "$bundle_venv" >/dev/null 2>&1 || return 1
  "$bundle_venv/bin/pip" install --quiet --disable-pip-version-check -r "$bundle_dir/requirements.txt" >"$bundle_cache/pip.log" 2>&1 ||
    { tail -n 20 "$bundle_cache/pip.log" >&2; return 1; }
  cp "$bundle_dir/requirements.txt" "$stamp"
}

# apt_install PKG...: installs Debian packages when running as root.
apt_install() {
  [ "$(id -u)" -eq 0 ] || return 1
  command -v apt-get >/dev/null || return 1
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "$@" >"$bundle_cache/apt.log" 2>&1 && return 0
  apt-get update -q >>"$bundle_cache/apt.log" 2>&1 || true
  apt-get install -y -q --no-install-recommends "$@" >>"$bundle_cache/apt.log" 2>&1
}
mkdir -p "$bundle_cache"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_for SECONDS CMD...: retries CMD every 0.2 s until it succeeds.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# The roost binary under test: ROOST_BIN, else target/debug/roost.
roost_bin=${ROOST_BIN:-$bundle_root/target/debug/roost}

# has_subcommand NAME: whether the binary knows `roost NAME`.
has_subcommand() {
  "$roost_bin" "$1" --help >/dev/null 2>&1
}

# jget KEY...: a value from the JSON document on stdin (keys and list indexes).
jget() {
  python3 -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1:]:
    v = v[int(k)] if isinstance(v, list) else v[k]
print(v if isinstance(v, str) else json.dumps(v))' "$@"
}

# login_post_readback BASE HANDLE PASSWORD TEXT: createSession, createRecord of
# an app.bsky.feed.post with TEXT, and getRecord of it (same uri, cid, text),
# all through the caller's `https` function (curl with its CA and --resolve).
# Writes the DID and the access token to $tmp/session_did and $tmp/session_jwt
# (check() runs it in a subshell, so no globals survive).
login_post_readback() {
  local base=$1 handle=$2 password=$3 text=$4 session session_did session_jwt created uri cid rkey got
  session=$(https --fail-with-body -H 'content-type: application/json' \
    -d "{\"identifier\": \"$handle\", \"password\": \"$password\"}" \
    "$base/xrpc/com.atproto.server.createSession") || { echo "createSession: $session"; return 1; }
  session_did=$(jget did <<<"$session") && session_jwt=$(jget accessJwt <<<"$session") || return 1
  [ "$(jget handle <<<"$session")" = "$handle" ] || { echo "createSession answered another handle: $session"; return 1; }
  echo "logged in as $handle ($session_did)"
  echo "$session_did" >"${tmp:?}/session_did" && echo "$session_jwt" >"$tmp/session_jwt" || return 1
  created=$(https --fail-with-body -H 'content-type: application/json' -H "authorization: Bearer $session_jwt" \
    -d "{\"repo\": \"$session_did\", \"collection\": \"app.bsky.feed.post\",
         \"record\": {\"\$type\": \"app.bsky.feed.post\", \"text\": \"$text\", \"createdAt\": \"2026-01-01T00:00:00.000Z\"}}" \
    "$base/xrpc/com.atproto.repo.createRecord") || { echo "createRecord: $created"; return 1; }
  uri=$(jget uri <<<"$created") && cid=$(jget cid <<<"$created") || return 1
  rkey=${uri##*/}
  echo "created $uri ($cid)"
  [[ $uri == "at://$session_did/app.bsky.feed.post/$rkey" ]] || { echo "unexpected uri $uri"; return 1; }
  got=$(https --fail-with-body \
    "$base/xrpc/com.atproto.repo.getRecord?repo=$session_did&collection=app.bsky.feed.post&rkey=$rkey") ||
    { echo "getRecord: $got"; return 1; }
  [ "$(jget uri <<<"$got")" = "$uri" ] || { echo "getRecord uri differs: $got"; return 1; }
  [ "$(jget cid <<<"$got")" = "$cid" ] || { echo "getRecord cid differs: $got"; return 1; }
  [ "$(jget value text <<<"$got")" = "$text" ] || { echo "getRecord text differs: $got"; return 1; }
}

# use_scratch_dir: sets $tmp (a new scratch directory) and $pids (background
# processes the caller starts and appends to), and on exit stops those
# processes and removes $tmp. Servers started inside check() (a subshell)
# record their pid in $tmp/pids instead.
use_scratch_dir() {
  tmp=$(mktemp -d)
  pids=()
  trap stop_and_remove_scratch EXIT
}
stop_and_remove_scratch() {
  local pid
  [ -f "$tmp/pids" ] && mapfile -t -O "${#pids[@]}" pids <"$tmp/pids"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
