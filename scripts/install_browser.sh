#!/usr/bin/env bash
# Installs what the browser tests need, quietly, doing nothing when it is already there:
# Debian's chromium (apt-get; needs root, as in CI) and playwright-core from npm into
# tests/auth/browser/node_modules (from the committed package-lock.json).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: /usr/bin/chromium is missing; run this script as root (apt-get install chromium)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if [ ! -x /usr/bin/node ] && ! command -v node >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: node is missing; run this script as root (apt-get install nodejs npm)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
browser_dir=tests/auth/browser
if [ ! -f "$browser_dir/node_modules/playwright-core/package.json" ]; then
  (cd "$browser_dir" && npm ci --no-audit --no-fund --silent >/dev/null)
fi
