#!/usr/bin/env bash
# deploy/init-env and .env.example: secrets filled once, kept afterwards, mode
# 600, other lines untouched; every secret documents how to generate it.
# Functions below run through check(), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/deploy"
cp deploy/init-env "$tmp/deploy/"
cp .env.example "$tmp/"
secrets=(PDS_ADMIN_PASSWORD PDS_JWT_SECRET GRAFANA_ADMIN_PASSWORD)
val() { sed -n "s/^$1=//p" "$2"; }

first_run() {
  "$tmp/deploy/init-env" >"$tmp/out1" 2>&1 || { cat "$tmp/out1"; return 1; }
  local env="$tmp/.env" key v
  [ -f "$env" ] || { echo "no .env created"; return 1; }
  [ "$(stat -c %a "$env")" = 600 ] || { echo "mode $(stat -c %a "$env")"; return 1; }
  for key in "${secrets[@]}"; do
    v=$(val "$key" "$env")
    [ "${#v}" -ge 32 ] || { echo "$key is '$v'"; return 1; }
    [ "$(grep -c "^$key=" "$env")" = 1 ] || { echo "$key appears more than once"; return 1; }
  done
  [ "$(val PDS_JWT_SECRET "$env")" != "$(val PDS_ADMIN_PASSWORD "$env")" ] || { echo "two secrets are equal"; return 1; }
  # Apart from the secrets, the file is .env.example.
  diff <(grep -Ev "^($(IFS='|'; echo "${secrets[*]}"))=" .env.example) \
    <(grep -Ev "^($(IFS='|'; echo "${secrets[*]}"))=" "$env") || return 1
  grep -q PDS_HOSTNAME "$tmp/out1" || { echo "no reminder to set PDS_HOSTNAME"; return 1; }
}
check "init-env: creates .env from .env.example, fills every secret, mode 600" first_run

second_run() {
  cp -p "$tmp/.env" "$tmp/env.before"
  chmod 644 "$tmp/.env"
  "$tmp/deploy/init-env" >"$tmp/out2" 2>&1 || { cat "$tmp/out2"; return 1; }
  cmp "$tmp/env.before" "$tmp/.env" || { diff "$tmp/env.before" "$tmp/.env"; return 1; }
  [ "$(stat -c %a "$tmp/.env")" = 600 ] || { echo "mode not restored to 600"; return 1; }
  grep -q 'nothing changed' "$tmp/out2" || { cat "$tmp/out2"; return 1; }
}
check "init-env: idempotent (second run changes nothing, restores mode 600)" second_run

keeps_values() {
  local env="$tmp/custom.env"
  printf '%s\n' '# mine' 'PDS_HOSTNAME=pds.example.com' 'PDS_JWT_SECRET="keep-this-secret-value"' 'OTHER=1' >"$env"
  "$tmp/deploy/init-env" "$env" >"$tmp/out3" 2>&1 || { cat "$tmp/out3"; return 1; }
  [ "$(val PDS_JWT_SECRET "$env")" = '"keep-this-secret-value"' ] || { echo "an existing secret was changed"; return 1; }
  if [ -z "$(val GRAFANA_ADMIN_PASSWORD "$env")" ] || [ -z "$(val PDS_ADMIN_PASSWORD "$env")" ]; then
    echo "missing keys not appended"
    return 1
  fi
  [ "$(head -n 4 "$env")" = "$(printf '%s\n' '# mine' 'PDS_HOSTNAME=pds.example.com' 'PDS_JWT_SECRET="keep-this-secret-value"' 'OTHER=1')" ] ||
    { echo "other lines changed"; return 1; }
  if grep -q PDS_HOSTNAME "$tmp/out3"; then echo "reminder printed although PDS_HOSTNAME is set"; return 1; fi
}
check "init-env: keeps existing values and other lines, appends missing secrets" keeps_values

env_example() {
  local key line
  # Required values come first: PDS_HOSTNAME before any other setting.
  [ "$(grep -Em1 '^#?[A-Z_]+=' .env.example)" = "PDS_HOSTNAME=" ] || { echo "PDS_HOSTNAME is not the first setting"; return 1; }
  for key in "${secrets[@]}" PDS_PLC_ROTATION_KEY_K256_PRIVATE_KEY_HEX PDS_PASSWORD; do
    line=$(grep -nE "^#?$key=" .env.example | head -n 1 | cut -d: -f1)
    [ -n "$line" ] || { echo "$key is not in .env.example"; return 1; }
    sed -n "$((line > 4 ? line - 4 : 1)),$((line - 1))p" .env.example | grep -q '^# Generate: ' ||
      { echo "$key has no '# Generate:' command above it"; return 1; }
  done
  # Optional settings are commented out, not empty (an empty value is a value).
  grep -nE '^[A-Z_]+=$' .env.example | grep -vE "^[0-9]+:(PDS_HOSTNAME|$(IFS='|'; echo "${secrets[*]}"))=$" &&
    { echo "empty optional settings above"; return 1; }
  return 0
}
check ".env.example: required first, each secret with its generate command, no empty optional values" env_example
exit "$bundle_failed"
