#!/usr/bin/env bash
# Creates .venv and installs the pinned dependencies; does nothing when they are already installed.
# Used by every make target, so a fresh clone needs no manual step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
stamp=.venv/.installed
want=$(cat requirements/runtime.txt requirements/dev.txt deploy/helm/checkov-requirements.txt pyproject.toml \
  | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# Runs a pip command quietly; on failure shows its output (minus this machine's index-path noise) and stops.
quiet() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "bootstrap: failed: $*" >&2
    exit 1
  fi
  rm -f "$log"
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
quiet .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip
quiet .venv/bin/python -m pip install --disable-pip-version-check -r requirements/dev.txt
quiet .venv/bin/python -m pip check
# checkov pins versions that clash with ours (packaging, python-dateutil): it gets a venv of its own.
if [ ! -x .venv/tools/checkov/bin/python ]; then
  "$PY" -m venv .venv/tools/checkov
fi
quiet .venv/tools/checkov/bin/python -m pip install --disable-pip-version-check \
  -r deploy/helm/checkov-requirements.txt
echo "$want" > "$stamp"
echo "bootstrap: dependencies installed in .venv"
