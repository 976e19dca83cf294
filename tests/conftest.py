"""Test-wide settings: no test may reach outside this machine."""

import os

# Flower's processes POST an update check and telemetry at start-up unless told not to.
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray: Flower's simulation backend
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
