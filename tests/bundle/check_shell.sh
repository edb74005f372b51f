#!/usr/bin/env bash
# Runs shellcheck over every shell script of the bundle and the test entry points.
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

if ! command -v shellcheck >/dev/null; then
  echo "installing shellcheck (Debian package shellcheck)"
  apt_install shellcheck || true
fi
if ! command -v shellcheck >/dev/null; then
  unavailable "shellcheck" "shellcheck is not installed and could not be installed (apt-get install shellcheck, as root)"
  exit "$bundle_failed"
fi
scripts=(tests/bundle/run tests/bundle/*.sh deploy/init-env deploy/backup-loop.sh scripts/test .ci/run)
check "shellcheck: ${scripts[*]}" shellcheck -x "${scripts[@]}"
exit "$bundle_failed"
