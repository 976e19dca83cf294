#!/usr/bin/env bash
# Regenerate requirements/lock.txt: exact versions of everything scripts/setup.sh installs,
# resolved by pip-tools from pyproject.toml's ranges (all extras) and requirements/pins.in.
# Run it after changing a dependency or after scripts/check-latest.sh passed, then run the
# tests on a fresh set-up (bash scripts/setup.sh in a clean clone) and commit the lock with
# the change.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pip-compile ] || .venv/bin/python -m pip install -q pip-tools
.venv/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url \
  --no-emit-find-links --extra dev --extra gguf --extra flower --extra simulation --extra tracking \
  --output-file requirements/lock.txt pyproject.toml requirements/pins.in "$@"
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) pinned packages"
