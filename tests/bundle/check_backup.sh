#!/usr/bin/env bash
# Backups: deploy/backup-loop.sh (what the compose `backup` service and the
# systemd timer run) with a stand-in roost, then, when the binary has
# `roost backup` and `roost restore`, the documented procedure for real: a
# backup of a running server, a restore into an empty data directory, and the
# restored server serving the same repository.
# Functions below run through check(), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
# shellcheck source=tests/bundle/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$bundle_root" || exit 1

use_scratch_dir
loop=$bundle_root/deploy/backup-loop.sh

# --- backup-loop.sh with a stand-in roost ---------------------------------------

mkdir -p "$tmp/bin"
cat >"$tmp/bin/roost" <<'EOF'
#!/bin/sh
# Stand-in: `roost backup --out DIR` writes DIR/manifest.json, or fails
# half-way when STUB_FAIL=1.
[ "$1" = backup ] && [ "$2" = --out ] || { echo "stub roost: unexpected: $*" >&2; exit 2; }
mkdir -p "$3" && echo '{}' >"$3/manifest.json"
[ "${STUB_FAIL:-}" != 1 ] || { echo "stub roost: failing" >&2; exit 1; }
EOF
chmod +x "$tmp/bin/roost"
loop_prunes() {
  local dest="$tmp/dest" n
  mkdir -p "$dest/roost-20200101T000000Z" "$dest/roost-20200102T000000Z" "$dest/roost-20200103T000000Z" "$dest/other"
  PATH="$tmp/bin:$PATH" BACKUP_ONCE=1 BACKUP_KEEP=2 BACKUP_DEST="$dest" sh "$loop" || return 1
  ls "$dest"
  n=$(find "$dest" -mindepth 1 -maxdepth 1 -name 'roost-*' | wc -l)
  [ "$n" = 2 ] || { echo "kept $n backups, want 2"; return 1; }
  [ -d "$dest/roost-20200103T000000Z" ] || { echo "pruned the newest old backup"; return 1; }
  [ -d "$dest/other" ] || { echo "removed a directory that is not a backup"; return 1; }
  find "$dest" -path "*/roost-2*/manifest.json" -newer "$tmp/bin/roost" | grep -q . || { echo "no new backup"; return 1; }
}
check "backup-loop.sh: one run (BACKUP_ONCE=1) backs up and keeps the newest BACKUP_KEEP" loop_prunes
loop_failure() {
  local dest="$tmp/dest-fail"
  mkdir -p "$dest"
  if PATH="$tmp/bin:$PATH" STUB_FAIL=1 BACKUP_ONCE=1 BACKUP_DEST="$dest" sh "$loop"; then
    echo "a failed backup exited 0"
    return 1
  fi
  if find "$dest" -name 'roost-*' | grep -q .; then echo "the partial backup was left behind"; return 1; fi
}
check "backup-loop.sh: a failed run exits non-zero and removes its partial directory" loop_failure

# --- the real thing -----------------------------------------------------------------

if ! has_subcommand backup || ! has_subcommand restore; then
  fail "backup: roost backup and restore" "$roost_bin has no 'backup'/'restore' subcommands"
  exit "$bundle_failed"
fi

python3 "$bundle_dir/fake_plc.py" "$tmp/plc.port" &
pids+=($!)
wait_for 10 test -s "$tmp/plc.port" || { fail "backup: stub PLC" "did not start"; exit "$bundle_failed"; }
host=pds.roost.test
plc_port=$(cat "$tmp/plc.port")
export PDS_HOSTNAME=$host PDS_DEV_MODE=true PDS_BIND_ADDRESS=127.0.0.1 PDS_HANDLE=alice.$host \
  PDS_PASSWORD=bundle-test-password PDS_DID_PLC_URL="http://127.0.0.1:$plc_port" \
  PDS_METRICS_LISTEN="" PDS_CRAWLERS=""
start_roost() { # start_roost DATA_DIR LOG: sets $port and $roost_pid
  port=$(free_port)
  PDS_PORT=$port PDS_DATA_DIRECTORY=$1 "$roost_bin" serve --dev >"$2" 2>&1 &
  roost_pid=$!
  echo "$roost_pid" >>"$tmp/pids"
  wait_for 60 curl -fsS "http://127.0.0.1:$port/xrpc/_health"
}
latest() { curl -fsS "http://127.0.0.1:$port/xrpc/com.atproto.sync.getLatestCommit?did=$1"; }

if ! start_roost "$tmp/data" "$tmp/roost.log"; then
  fail "backup: roost starts" "$(tail -n 15 "$tmp/roost.log")"
  exit "$bundle_failed"
fi
did=$(curl -fsS "http://127.0.0.1:$port/xrpc/com.atproto.identity.resolveHandle?handle=alice.$host" | python3 -c 'import json,sys; print(json.load(sys.stdin)["did"])')
before=$(latest "$did")

# backup-loop.sh calls `roost` from PATH: the binary under test, by that name.
mkdir -p "$tmp/realbin"
ln -s "$roost_bin" "$tmp/realbin/roost"
backup_running() {
  PDS_PORT=$port PDS_DATA_DIRECTORY="$tmp/data" PATH="$tmp/realbin:$PATH" \
    BACKUP_ONCE=1 BACKUP_DEST="$tmp/backups" sh "$loop" || return 1
  backup=$(find "$tmp/backups" -mindepth 1 -maxdepth 1 -name 'roost-*' | head -n 1)
  [ -f "$backup/manifest.json" ] || { echo "no manifest.json in $backup"; return 1; }
  [ -f "$tmp/data/last-backup.json" ] || { echo "no last-backup.json in the data directory"; return 1; }
  echo "$backup: $(find "$backup" -type f | wc -l) files"
}
check "backup: roost backup of the running server (through backup-loop.sh)" backup_running
backup=$(find "$tmp/backups" -mindepth 1 -maxdepth 1 -name 'roost-*' | head -n 1)

kill "$roost_pid"
wait "$roost_pid" 2>/dev/null
restore_and_serve() {
  local after
  [ -n "$backup" ] || return 1
  PDS_DATA_DIRECTORY="$tmp/restored" "$roost_bin" restore --from "$backup" || return 1
  start_roost "$tmp/restored" "$tmp/restored.log" || { tail -n 15 "$tmp/restored.log"; return 1; }
  after=$(latest "$did")
  kill "$roost_pid"
  echo "before: $before"
  echo "after:  $after"
  [ -n "$after" ] && [ "$after" = "$before" ]
}
check "backup: roost restore into an empty data directory; the restored server has the same repository" restore_and_serve
refuses_nonempty() {
  sleep 1
  if [ -z "$backup" ] || [ ! -f "$tmp/restored/roost.sqlite" ]; then echo "needs the restore above"; return 1; fi
  if PDS_DATA_DIRECTORY="$tmp/restored" "$roost_bin" restore --from "$backup" >"$tmp/refused" 2>&1; then
    echo "restore overwrote a non-empty data directory without --force"
    return 1
  fi
  cat "$tmp/refused"
  grep -q -- '--force' "$tmp/refused" || { echo "the refusal does not mention --force"; return 1; }
}
check "backup: roost restore refuses a non-empty data directory without --force" refuses_nonempty
exit "$bundle_failed"
