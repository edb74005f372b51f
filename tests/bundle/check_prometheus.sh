#!/usr/bin/env bash
# promtool: the Prometheus config, the alert rules, and their unit tests.
# promtool comes from Debian's `prometheus` package (installed when missing and
# running as root).
# Functions below run through check(), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

if ! command -v promtool >/dev/null; then
  echo "installing promtool (Debian package prometheus)"
  apt_install prometheus || true
fi
if ! command -v promtool >/dev/null; then
  unavailable "promtool" "promtool is not installed and could not be installed (apt-get install prometheus, as root)"
  exit "$bundle_failed"
fi
echo "promtool: $(promtool --version 2>&1 | head -n 1)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The config names its rules where compose mounts them (/etc/prometheus/rules);
# check a copy that points at the files in the repository instead, so the
# rules are loaded as part of the config check.
sed "s#/etc/prometheus/rules/#$bundle_root/prometheus/rules/#" prometheus/prometheus.yml >"$tmp/prometheus.yml"
check_config() {
  local out
  out=$(promtool check config "$tmp/prometheus.yml" 2>&1) || { echo "$out"; return 1; }
  echo "$out"
  # A glob that matches nothing passes silently; insist that rules were read.
  grep -q 'rules found' <<<"$out" || { echo "no rule file was loaded through rule_files"; return 1; }
}
check "promtool check config prometheus/prometheus.yml" check_config
check "promtool check rules prometheus/rules/*.yml" promtool check rules prometheus/rules/*.yml
check "promtool test rules prometheus/tests/*.yml" promtool test rules prometheus/tests/*.yml
exit "$bundle_failed"
