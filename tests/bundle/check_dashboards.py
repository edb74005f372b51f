"""Static checks of the Grafana provisioning, the dashboards and the alert rules.

Usage: python check_dashboards.py REPO_ROOT   (needs PyYAML)

Prints one PASS/FAIL line per check (tests/bundle/run counts them) and exits 1
when any check fails:
- datasources: provisioning parses, uids are unique, exemplar links and
  cross-links name provisioned uids;
- dashboard provider: its path is where docker-compose.yml mounts
  grafana/dashboards;
- per dashboard: structure (uid, title, unique panel ids, grid inside 24
  columns and no overlaps), every panel and query names a provisioned
  datasource uid, every PromQL query uses only metric names and labels from
  metrics.txt (the ops contract), and the Roost dashboard covers every topic;
- alert rules: same metric/label check, and every alert has a promtool test
  where it fires and one where it does not;
- a real PromQL parse: every dashboard query (Grafana variables substituted)
  and every alert-rule expression becomes a recording rule in a temporary rule
  file that `promtool check rules` must accept (a self-test first makes sure a
  broken expression is rejected). promtool is found on PATH (tests/bundle/run
  installs Debian's prometheus package when missing); without it this is a
  SKIP, or a FAIL when CI=true.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = sys.argv[1]
failed = False


def skip(name, why):
    global failed
    if os.environ.get("CI") == "true":
        result(name, [why + " (CI=true: a missing component is a failure)"])
    else:
        print(f"*** SKIP: {name}: {why} ***")


def result(name, problems):
    global failed
    if problems:
        failed = True
        print(f"FAIL: {name}: " + "; ".join(problems[:12]) + (f" (+{len(problems) - 12} more)" if len(problems) > 12 else ""))
    else:
        print(f"PASS: {name}")


# --- the contract ---------------------------------------------------------

METRICS = {}  # name -> (type, set of labels)
with open(os.path.join(ROOT, "tests/bundle/metrics.txt")) as f:
    for line in f:
        line = line.split("#", 1)[0].split()
        if not line:
            continue
        name, kind, labels = line
        METRICS[name] = (kind, set() if labels == "-" else set(labels.split(",")))

TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "inf", "nan", "atan2"}
HIST_SUFFIXES = ("_bucket", "_sum", "_count")


def base_metric(name):
    """The contract name of a series name (histogram series map to their base)."""
    if name in METRICS:
        return name
    for suffix in HIST_SUFFIXES:
        if name.endswith(suffix) and METRICS.get(name[: -len(suffix)], ("",))[0] == "histogram":
            return name[: -len(suffix)]
    return None


def promql_problems(expr):
    """Metric names and label names in EXPR that the contract does not have."""
    problems = []
    if not expr.strip():
        return ["empty query"]
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, including Grafana's $__rate_interval
    used = []  # (metric or None, labels used in its matcher)
    # metric{matchers}
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", text):
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        used.append((m.group(1), labels))
    bare = re.sub(r"\{[^}]*\}", " ", text)
    grouping = []
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", bare):
        grouping += [g.strip() for g in m.group(2).split(",") if g.strip()]
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", bare):
        name, call = m.group(1), m.group(2)
        if call or name in KEYWORDS:
            continue
        if not any(u[0] == name for u in used):
            used.append((name, set()))
    names = set()
    for name, labels in used:
        if name is None:
            problems.append(f"selector without a metric name in {expr!r}")
            continue
        base = base_metric(name)
        if base is None:
            problems.append(f"{name} is not in the contract")
            continue
        names.add(base)
        allowed = METRICS[base][1] | TARGET_LABELS | {"__name__"} | ({"le"} if name.endswith("_bucket") else set())
        for label in labels - allowed:
            problems.append(f"{name} has no label {label!r}")
    if names:
        allowed = set(TARGET_LABELS) | {"le"}
        for n in names:
            allowed |= METRICS[n][1]
        for label in grouping:
            if label not in allowed:
                problems.append(f"grouping by {label!r}, which none of {sorted(names)} has")
    return problems


def metric_names(expr):
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]|\{[^}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    out = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        if not m.group(2) and m.group(1) not in KEYWORDS and base_metric(m.group(1)):
            out.add(base_metric(m.group(1)))
    return out


# The promql checker must itself catch mistakes (a broken checker passes
# everything): a few known-bad expressions.
selftest = []
for bad in [
    "rate(roost_http_request_total[5m])",  # misspelt metric
    'sum by (method) (rate(roost_repo_commits_total[5m]))',  # label it lacks
    'roost_http_requests_total{statuss="500"}',  # misspelt label
    "histogram_quantile(0.9, rate(roost_firehose_subscribers_bucket[5m]))",  # not a histogram
]:
    if not promql_problems(bad):
        selftest.append(f"accepted {bad!r}")
for good in [
    'histogram_quantile(0.95, sum by (le, method) (rate(roost_http_request_duration_seconds_bucket[$__rate_interval])))',
    'sum(rate(roost_http_requests_total{status=~"5.."}[5m])) / sum(rate(roost_http_requests_total[5m])) > 0.05',
    'up{job="pds"} == 0',
]:
    if promql_problems(good):
        selftest.append(f"rejected {good!r}: {promql_problems(good)}")
result("dashboard checker self-test", selftest)

# --- datasources ----------------------------------------------------------

problems = []
uids = {}
for path in sorted(glob.glob(os.path.join(ROOT, "grafana/provisioning/datasources/*.y*ml"))):
    doc = yaml.safe_load(open(path))
    for ds in doc.get("datasources", []):
        uid = ds.get("uid")
        if not uid:
            problems.append(f"{ds.get('name')} has no fixed uid")
            continue
        if uid in uids:
            problems.append(f"uid {uid} used twice")
        uids[uid] = ds
        for key in ("name", "type", "url"):
            if not ds.get(key):
                problems.append(f"{uid} has no {key}")
if not uids:
    problems.append("no datasources provisioned")
for uid, ds in uids.items():
    jd = ds.get("jsonData") or {}
    refs = [d.get("datasourceUid") for d in jd.get("exemplarTraceIdDestinations", [])]
    refs += [(jd.get(k) or {}).get("datasourceUid") for k in ("serviceMap", "tracesToMetrics", "tracesToLogsV2")]
    for ref in refs:
        if ref is not None and ref not in uids:
            problems.append(f"{uid} links to unknown datasource uid {ref}")
prom = [u for u, d in uids.items() if d.get("type") == "prometheus"]
tempo = [u for u, d in uids.items() if d.get("type") == "tempo"]
if not prom or not tempo:
    problems.append("need a prometheus and a tempo datasource")
elif not any(d.get("datasourceUid") in tempo for d in (uids[prom[0]].get("jsonData") or {}).get("exemplarTraceIdDestinations", [])):
    problems.append("the Prometheus datasource has no exemplar link to Tempo")
result("grafana datasources (fixed uids, links resolve)", problems)

# --- dashboard provider vs compose mount -------------------------------------

problems = []
compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
mounts = {}
for vol in compose["services"]["grafana"].get("volumes", []):
    if isinstance(vol, str):
        parts = vol.split(":")
        mounts[parts[1]] = parts[0]
    else:
        mounts[vol["target"]] = vol.get("source")
dash_dirs = []
for path in sorted(glob.glob(os.path.join(ROOT, "grafana/provisioning/dashboards/*.y*ml"))):
    for prov in yaml.safe_load(open(path)).get("providers", []):
        target = prov.get("options", {}).get("path")
        src = mounts.get(target)
        if src is None:
            problems.append(f"provider path {target} is not mounted into the grafana service")
            continue
        host = os.path.normpath(os.path.join(ROOT, src))
        if not glob.glob(os.path.join(host, "*.json")):
            problems.append(f"{src} (mounted at {target}) holds no dashboard")
        dash_dirs.append(host)
if "/etc/grafana/provisioning" not in mounts:
    problems.append("grafana/provisioning is not mounted at /etc/grafana/provisioning")
result("grafana dashboard provider matches the compose mounts", problems)

# --- dashboards -------------------------------------------------------------

TOPICS = {
    "traffic": {"roost_http_requests_total"},
    "latency": {"roost_http_request_duration_seconds"},
    "errors": {"roost_http_requests_total"},
    "writes": {"roost_repo_commits_total", "roost_repo_records_written_total"},
    "firehose consumers": {"roost_firehose_subscribers"},
    "relay status": {"roost_relay_crawl_requests_total", "roost_relay_last_crawl_success_timestamp_seconds"},
    "storage growth": {"roost_sqlite_file_bytes"},
    "blob tiers": {"roost_blobs", "roost_blob_bytes"},
    "backups": {"roost_backup_last_success_timestamp_seconds"},
    "resources": {"process_resident_memory_bytes", "process_cpu_seconds_total"},
}


def ds_uid(ds):
    if isinstance(ds, dict):
        return ds.get("uid")
    return ds  # legacy: a name or uid string


# Grafana's global variables, and the value each stands for in the parse.
GLOBAL_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600", "__range_ms": "3600000", "__interval_ms": "60000"}
VAR_RE = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)(?::[^\]]*)?\]\]")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def substitute(expr, variables):
    """EXPR with Grafana variables replaced: inside a string (a label matcher)
    by `.*`, which every matcher accepts; elsewhere by the global variable's
    stand-in or the dashboard variable's current value. Unknown variables are
    left as they are, so the parse fails on them."""

    def outside(text):
        def repl(m):
            name = m.group(1) or m.group(2) or m.group(3)
            if name in GLOBAL_VARS:
                return GLOBAL_VARS[name]
            return variables.get(name, m.group(0))

        return VAR_RE.sub(repl, text)

    out, pos = [], 0
    for m in STRING_RE.finditer(expr):
        out.append(outside(expr[pos : m.start()]))
        out.append(VAR_RE.sub(".*", m.group(0)))
        pos = m.end()
    out.append(outside(expr[pos:]))
    return "".join(out)


def current_value(var):
    cur = (var.get("current") or {}).get("value")
    if isinstance(cur, list):
        cur = cur[0] if cur else None
    if cur in (None, "", "$__all"):
        opts = [o.get("value") for o in var.get("options", []) if o.get("value") not in (None, "$__all")]
        cur = opts[0] if opts else None
    return None if cur is None else str(cur)


PARSE = []  # (where, PromQL with variables substituted)
dashboards = sorted({p for d in dash_dirs for p in glob.glob(os.path.join(d, "*.json"))})
seen_uids = set()
for path in dashboards:
    rel = os.path.relpath(path, ROOT)
    problems = []
    try:
        dash = json.load(open(path))
    except ValueError as e:
        result(f"{rel} structure", [f"not JSON: {e}"])
        continue
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dash:
            problems.append(f"no {key}")
    if dash.get("uid") in seen_uids:
        problems.append(f"dashboard uid {dash.get('uid')} used twice")
    seen_uids.add(dash.get("uid"))
    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels += p.get("panels", [])  # collapsed rows
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append("panel ids missing or not unique")
    boxes = []
    for p in panels:
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["w"] <= 0 or g["h"] <= 0 or g["x"] < 0 or g["x"] + g["w"] > 24:
            problems.append(f"panel {p.get('id')} has a bad gridPos {g}")
            continue
        for q in boxes:
            if g["x"] < q["x"] + q["w"] and q["x"] < g["x"] + g["w"] and g["y"] < q["y"] + q["h"] and q["y"] < g["y"] + g["h"]:
                problems.append(f"panel {p.get('id')} overlaps another")
        boxes.append(g)
        if not p.get("title") and p.get("type") != "row":
            problems.append(f"panel {p.get('id')} has no title")
    result(f"{rel} structure", problems)

    problems = []
    used = set()
    variables = {}
    for var in dash.get("templating", {}).get("list", []):
        vds = ds_uid(var.get("datasource"))
        if var.get("type") == "query" and vds not in uids:
            problems.append(f"variable {var.get('name')!r} datasource uid {vds!r} is not provisioned")
        value = current_value(var)
        if value is not None:
            variables[var.get("name")] = value
    for p in panels:
        if p.get("type") == "row":
            continue
        pds = ds_uid(p.get("datasource"))
        if pds not in uids:
            problems.append(f"panel {p.get('title')!r} datasource uid {pds!r} is not provisioned")
        if not p.get("targets"):
            problems.append(f"panel {p.get('title')!r} has no query")
        for t in p.get("targets", []):
            tds = ds_uid(t.get("datasource")) or pds
            if tds not in uids:
                problems.append(f"panel {p.get('title')!r} query {t.get('refId')} datasource uid {tds!r} is not provisioned")
            if uids.get(tds, {}).get("type") == "prometheus":
                for prob in promql_problems(t.get("expr", "")):
                    problems.append(f"panel {p.get('title')!r}: {prob}")
                used |= metric_names(t.get("expr", ""))
                PARSE.append((f"{rel} panel {p.get('id')} {p.get('title')!r} query {t.get('refId')}", substitute(t.get("expr", ""), variables)))
    for ann in dash.get("annotations", {}).get("list", []):
        a = ds_uid(ann.get("datasource"))
        if a not in uids and a != "-- Grafana --":
            problems.append(f"annotation {ann.get('name')!r} datasource uid {a!r} is not provisioned")
        elif uids.get(a, {}).get("type") == "prometheus" and ann.get("expr"):
            PARSE.append((f"{rel} annotation {ann.get('name')!r}", substitute(ann["expr"], variables)))
    result(f"{rel} queries (datasource uids, contract metric names)", problems)

    if dash.get("uid") == "roost-overview":
        missing = [topic for topic, need in TOPICS.items() if not (need & used)]
        exemplars = any(t.get("exemplar") for p in panels for t in p.get("targets", []) if "duration_seconds_bucket" in t.get("expr", ""))
        problems = [f"no panel shows {topic}" for topic in missing]
        if not exemplars:
            problems.append("no latency panel asks for exemplars")
        result(f"{rel} covers every topic", problems)
if not dashboards:
    result("dashboards present", ["no dashboard JSON found"])

# --- alert rules ----------------------------------------------------------

problems = []
alerts = []
for path in sorted(glob.glob(os.path.join(ROOT, "prometheus/rules/*.yml"))):
    for group in yaml.safe_load(open(path)).get("groups", []):
        for rule in group.get("rules", []):
            for prob in promql_problems(rule.get("expr", "")):
                problems.append(f"{rule.get('alert') or rule.get('record')}: {prob}")
            PARSE.append((f"{os.path.relpath(path, ROOT)} {rule.get('alert') or rule.get('record')}", str(rule.get("expr", ""))))
            if rule.get("alert"):
                alerts.append(rule["alert"])
                if not rule.get("annotations", {}).get("summary") or not rule.get("labels", {}).get("severity"):
                    problems.append(f"{rule['alert']} needs a summary and a severity")
result("alert rules use contract metric names", problems)

REQUIRED_ALERTS = {
    "PDS down": "RoostDown",
    "disk nearly full": "RoostDiskNearlyFull",
    "no relay connected": "RoostNoRelayConnected",
    "backup stale": "RoostBackupStale",
    "error rate": "RoostHighErrorRate",
}
problems = [f"no alert for {what} ({name})" for what, name in REQUIRED_ALERTS.items() if name not in alerts]
fires, quiet = set(), set()
for path in sorted(glob.glob(os.path.join(ROOT, "prometheus/tests/*.yml"))):
    for test in yaml.safe_load(open(path)).get("tests", []):
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case.get("alertname"))
for name in alerts:
    if name not in fires:
        problems.append(f"no test where {name} fires")
    if name not in quiet:
        problems.append(f"no test where {name} stays quiet")
result("every alert is tested firing and not firing", problems)

# --- a real PromQL parse (promtool) -----------------------------------------


def promtool_parse(exprs):
    """Runs `promtool check rules` on one recording rule per expression;
    returns (ok, output with the rule names mapped back to where each came from)."""
    names = {f"bundle_check:expr_{i}": where for i, (where, _) in enumerate(exprs)}
    doc = {"groups": [{"name": "bundle_check", "rules": [{"record": f"bundle_check:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "exprs.yml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        proc = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).replace(path, "<generated rules>")
    for name, where in sorted(names.items(), key=lambda kv: -len(kv[0])):
        out = out.replace(name, where)
    # promtool counts what it read; anything short of all of them is a failure too.
    ok = proc.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in out
    return ok, out.strip()


promtool = shutil.which("promtool")
if not promtool:
    skip("promtool parses every dashboard query and alert expression", "promtool is not installed (Debian package prometheus)")
else:
    problems = []
    # Self-test: the parse must be able to fail, and variables must become valid PromQL.
    for bad in ["sum(rate(roost_http_requests_total[5m])", "rate(roost_http_requests_total[$__rate_interval]", 'roost_blobs{tier="$tier"', "roost_blobs offset"]:
        ok, _ = promtool_parse([("self-test", substitute(bad, {}))])
        if ok:
            problems.append(f"promtool accepted {bad!r}")
    ok, out = promtool_parse([("self-test", substitute('sum by (le) (rate(roost_http_request_duration_seconds_bucket{method=~"${method:regex}", tier=~"$tier"}[$__rate_interval])) / $scale', {"scale": "2"}))])
    if not ok:
        problems.append(f"promtool rejected a valid query with variables: {out}")
    ok, out = promtool_parse([("self-test", substitute("rate(roost_http_requests_total[$unknown_var])", {}))])
    if ok:
        problems.append("an unknown Grafana variable was not caught")
    result("promtool parse self-test (broken expressions are rejected)", problems)

    if not PARSE:
        result("promtool parses every dashboard query and alert expression", ["no expression collected"])
    else:
        ok, out = promtool_parse(PARSE)
        print(f"promtool check rules on {len(PARSE)} expressions: {out.splitlines()[-1] if out else ''}")
        result(f"promtool parses every dashboard query and alert expression ({len(PARSE)})", [] if ok else [out])

sys.exit(1 if failed else 0)
