#!/bin/sh
# The compose `backup` service (profile `backup`): every BACKUP_INTERVAL_SECONDS
# (default 86400) takes an online snapshot with `roost backup` into
# /backups/roost-<UTC time>, then keeps the newest BACKUP_KEEP (default 7).
# A failed run removes its partial directory and is retried after 5 minutes.
# BACKUP_ONCE=1: one run, then exit with its status (for cron or a systemd
# timer: `docker compose run --rm -e BACKUP_ONCE=1 backup`).
# Runs in the Roost image (POSIX sh; no bash there).
set -u
interval=${BACKUP_INTERVAL_SECONDS:-86400}
keep=${BACKUP_KEEP:-7}
dest=${BACKUP_DEST:-/backups}
# SQLite's temporary files go next to the backups, not into the small /tmp.
export TMPDIR="$dest/.tmp"
mkdir -p "$TMPDIR"

prune() {
  # Names sort by time; everything but the newest $keep goes.
  find "$dest" -mindepth 1 -maxdepth 1 -type d -name 'roost-*' | sort -r | tail -n +"$((keep + 1))" | while read -r old; do
    echo "backup: removing $old"
    rm -rf "$old"
  done
}

while :; do
  dir="$dest/roost-$(date -u +%Y%m%dT%H%M%SZ)"
  echo "backup: starting $dir"
  if roost backup --out "$dir"; then
    echo "backup: finished $dir"
    touch /tmp/backup-ok
    prune
    [ "${BACKUP_ONCE:-}" = 1 ] && exit 0
    sleep "$interval"
  else
    echo "backup: FAILED" >&2
    rm -rf "$dir" /tmp/backup-ok
    [ "${BACKUP_ONCE:-}" = 1 ] && exit 1
    echo "backup: retrying in 5 minutes" >&2
    sleep 300
  fi
done
