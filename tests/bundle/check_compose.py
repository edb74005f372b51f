"""Policy checks of docker-compose.yml, on `docker compose config --format json`.

Usage: python check_compose.py REPO_ROOT FULL.json OVERRIDE.json PORTS.json
  FULL.json      config with every profile enabled (tracing, backup)
  OVERRIDE.json  config with docker-compose.override.example.yml added
  PORTS.json     config with CADDY_HTTP_PORT=8080, CADDY_HTTPS_PORT=8443 and
                 CADDY_LOCAL_CERTS=true
Prints PASS/FAIL lines; exits 1 when any check fails.
"""

import json
import os
import re
import sys

import yaml

root, full_path, override_path, ports_path = sys.argv[1:5]
full = json.load(open(full_path))
override = json.load(open(override_path))
ports = json.load(open(ports_path))
source = yaml.safe_load(open(os.path.join(root, "docker-compose.yml")))
failed = False


def result(name, problems):
    global failed
    if problems:
        failed = True
        print(f"FAIL: compose: {name}: " + "; ".join(problems))
    else:
        print(f"PASS: compose: {name}")


services = full["services"]
ONE_SHOT = {"tempo-init"}

problems = []
if "version" in source:
    problems.append("top-level `version:` key (obsolete)")
for name in ("pds", "caddy", "prometheus", "grafana", "tempo", "backup"):
    if name not in services:
        problems.append(f"no {name} service")
for name, profile in (("tempo", "tracing"), ("backup", "backup")):
    if profile not in (services.get(name, {}).get("profiles") or []):
        problems.append(f"{name} is not under the {profile!r} profile")
for name in ("pds", "caddy", "prometheus", "grafana"):
    if services.get(name, {}).get("profiles"):
        problems.append(f"{name} should run without a profile")
result("services and profiles", problems)

problems = []
roost_image = services["pds"].get("image")
for name, svc in services.items():
    image = svc.get("image", "")
    if image == roost_image and "build" in services["pds"]:
        continue  # built here
    if "@sha256:" in image:
        continue
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    if not re.search(r"\d+\.\d+\.\d+", tag):
        problems.append(f"{name}: image {image!r} is not pinned to an exact version")
result("third-party images pinned to exact versions", problems)

problems = []
vols = set((full.get("volumes") or {}).keys())
for need in ("pds-data", "caddy-data", "caddy-config", "prometheus-data", "grafana-data", "tempo-data"):
    if need not in vols:
        problems.append(f"no named volume {need}")
for name, svc in services.items():
    for v in svc.get("volumes", []):
        if v["type"] == "bind":
            src = v["source"]
            if not os.path.exists(src):
                problems.append(f"{name}: bind source {src} does not exist")
            elif not v.get("read_only"):
                problems.append(f"{name}: bind mount {src} is not read-only")
        elif v["type"] == "volume" and v["source"] not in vols:
            problems.append(f"{name}: unknown volume {v['source']}")
mounts = {v["target"]: v.get("source") for v in services["pds"].get("volumes", [])}
if mounts.get("/pds") != "pds-data":
    problems.append("pds data (/pds) is not the pds-data volume")
result("named volumes and bind mounts", problems)

problems = []
for name, svc in services.items():
    hc = svc.get("healthcheck")
    if name in ONE_SHOT:
        continue
    if not hc or hc.get("disable") or not hc.get("test"):
        problems.append(f"{name} has no healthcheck")
    for dep, cond in (svc.get("depends_on") or {}).items():
        want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
        if cond.get("condition") != want:
            problems.append(f"{name} depends on {dep} without condition {want}")
if services["pds"].get("healthcheck", {}).get("test") != ["CMD", "roost", "healthcheck"]:
    problems.append("pds healthcheck is not `roost healthcheck`")
if "pds" not in (services["caddy"].get("depends_on") or {}):
    problems.append("caddy does not wait for a healthy pds")
result("healthchecks and depends_on conditions", problems)

problems = []
for name, svc in services.items():
    if not svc.get("read_only"):
        problems.append(f"{name} root filesystem is writable")
    if "ALL" not in (svc.get("cap_drop") or []):
        problems.append(f"{name} keeps its capabilities")
    if not any("no-new-privileges" in o for o in svc.get("security_opt") or []):
        problems.append(f"{name} lacks no-new-privileges")
    log = svc.get("logging") or {}
    opts = log.get("options") or {}
    if log.get("driver") != "json-file" or "max-size" not in opts or "max-file" not in opts:
        problems.append(f"{name} has no log rotation")
extra = set(services["caddy"].get("cap_add") or [])
if extra - {"NET_BIND_SERVICE"}:
    problems.append(f"caddy adds capabilities {sorted(extra)}")
result("read-only root, dropped capabilities, log rotation", problems)

problems = []
for name, svc in services.items():
    for p in svc.get("ports", []):
        if name == "caddy":
            continue
        if p.get("host_ip") != "127.0.0.1":
            problems.append(f"{name} publishes {p.get('published')} on {p.get('host_ip') or 'all addresses'}")
for name in ("prometheus", "grafana", "tempo"):
    if not services[name].get("ports"):
        problems.append(f"{name} is not published on 127.0.0.1")
if services["pds"].get("ports"):
    problems.append("pds is published directly (only Caddy should be)")
caddy_ports = {(p["target"], p.get("published"), p.get("protocol")) for p in services["caddy"].get("ports", [])}
if not {(80, "80", "tcp"), (443, "443", "tcp")} <= caddy_ports:
    problems.append(f"caddy does not publish 80 and 443 by default: {sorted(caddy_ports)}")
pc = ports["services"]["caddy"]
pp = {(p["target"], p.get("published"), p.get("protocol")) for p in pc.get("ports", [])}
if not {(8080, "8080", "tcp"), (8443, "8443", "tcp")} <= pp:
    problems.append(f"CADDY_HTTP_PORT/CADDY_HTTPS_PORT do not move the published ports: {sorted(pp)}")
env = pc.get("environment") or {}
if env.get("CADDY_HTTP_PORT") != "8080" or env.get("CADDY_HTTPS_PORT") != "8443" or env.get("CADDY_LOCAL_CERTS") != "true":
    problems.append("Caddy does not get CADDY_HTTP_PORT/CADDY_HTTPS_PORT/CADDY_LOCAL_CERTS")
if (services["caddy"].get("environment") or {}).get("CADDY_LOCAL_CERTS") != "false":
    problems.append("CADDY_LOCAL_CERTS does not default to false (public ACME)")
penv = services["pds"].get("environment") or {}
if penv.get("PDS_METRICS_LISTEN", "").split(":")[-1] != "9464" or penv.get("PDS_DATA_DIRECTORY") != "/pds":
    problems.append("pds lacks PDS_METRICS_LISTEN=...:9464 or PDS_DATA_DIRECTORY=/pds")
result("published ports and the .env port/TLS switches", problems)

problems = []
osvc = override["services"]
if "caddy" in osvc:
    problems.append("caddy still runs with the override example")
op = [(p.get("host_ip"), p["target"]) for p in osvc["pds"].get("ports", [])]
if op != [("127.0.0.1", 2583)]:
    problems.append(f"pds ports with the override: {op}")
result("override example (own proxy): no caddy, pds on 127.0.0.1:2583", problems)

sys.exit(1 if failed else 0)
