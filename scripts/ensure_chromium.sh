#!/usr/bin/env bash
# Make sure a Chromium the browser test can drive exists (Debian's `chromium`; Playwright's own browser
# download needs the internet). Idempotent: present -> nothing; missing -> apt-get install when root (or
# passwordless sudo). Never fails `make test`: without a browser the UI test skips with the reason.
set -uo pipefail

log() { echo "ensure_chromium: $*" >&2; }

for candidate in "${LLMFT_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then
    log "found $candidate"
    exit 0
  fi
done

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else return 1; fi
}

if command -v apt-get >/dev/null 2>&1; then
  log "Chromium is not installed: installing Debian's chromium with apt-get"
  if as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
    && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; then
    exit 0
  fi
fi
log "could not install Chromium; the browser test will be skipped (set LLMFT_CHROMIUM to a browser binary)"
exit 0
