#!/usr/bin/env bash
# Make sure a PostgreSQL server accepts connections on $PGHOST:$PGPORT (default 127.0.0.1:5432).
# Idempotent: already up -> nothing; installed but down -> start it; missing -> apt-get install, start.
# Used by .ci/run before the PostgreSQL-backed tests (llmft_assets_tests/test_postgres_*.py).
set -euo pipefail

PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
WAIT_SECONDS="${ENSURE_POSTGRES_WAIT_SECONDS:-60}"
installed_now=0

log() { echo "ensure_postgres: $*" >&2; }

is_ready() {
  command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$PGHOST" -p "$PGPORT"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else
    log "need root for: $*"; return 1; fi
}

wait_ready() {
  local waited=0
  until is_ready; do
    if [ "$waited" -ge "$WAIT_SECONDS" ]; then
      log "PostgreSQL did not accept connections on $PGHOST:$PGPORT within ${WAIT_SECONDS}s"
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

if is_ready; then
  log "PostgreSQL is up on $PGHOST:$PGPORT"
  exit 0
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  log "PostgreSQL is not installed: installing it with apt-get"
  installed_now=1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-client
  # A fresh CI install: let local test connections in as `postgres` without a password, the way the
  # tests expect (never do this on a shared or production server).
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    if ! grep -q "llmft-ci" "$hba"; then
      log "allowing trust auth from localhost in $hba"
      as_root sh -c "sed -i '1i host all all 127.0.0.1/32 trust # llmft-ci\\nhost all all ::1/128 trust # llmft-ci' '$hba'"
    fi
  done
fi

# Start every installed cluster that is down (normally one: <version>/main).
for version_dir in /etc/postgresql/*/; do
  version="$(basename "$version_dir")"
  for cluster_dir in "$version_dir"*/; do
    cluster="$(basename "$cluster_dir")"
    if ! pg_lsclusters -h 2>/dev/null | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c && $4 == "online"' | grep -q .; then
      log "starting cluster $version/$cluster"
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start || true
    elif [ "$installed_now" -eq 1 ]; then
      # apt started it before pg_hba.conf changed: reload so the trust lines apply.
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" reload || true
    fi
  done
done

wait_ready
log "PostgreSQL is up on $PGHOST:$PGPORT"
