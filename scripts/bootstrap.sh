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
want=$(cat requirements/runtime.txt requirements/dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip check >/dev/null
echo "$want" > "$stamp"
echo "bootstrap: dependencies installed in .venv"
