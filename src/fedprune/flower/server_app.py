"""The ServerApp: resolve the experiment from the run config, run the fedprune round loop.

`app` serves deployments and `flwr run` on either runtime (SuperNodes or Flower's simulation
engine). `server_app(run_config)` makes one with a fixed run config for Flower's Python
simulation API, `flwr.simulation.run_simulation`, which has no run config to pass.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.config import get_project_dir
from flwr.serverapp import Grid, ServerApp

from fedprune.config import ConfigError
from fedprune.flower.settings import FlowerSettings
from fedprune.flower.strategy import FedpruneStrategy


def _log_to_stderr() -> None:
    """fedprune's INFO lines (rounds, drops) reach `flwr run --stream` / `flwr log` only
    through the process output Flower mirrors; the logger has no handler by default."""
    logger = logging.getLogger("fedprune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fedprune %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def app_dir(grid: Grid) -> Path | None:
    """Where the SuperLink unpacked the submitted app (FAB), if it is known."""
    run = grid.run
    return get_project_dir(run.fab_id, run.fab_version, run.fab_hash) if run.fab_id else None


def server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` (run-config keys as in pyproject.toml, e.g.
    ``{"experiment": "configs/aoh.toml", "run-dir": "runs/x"}``) is laid over the run's."""
    run_config = dict(run_config or {})
    if unknown := set(run_config) - {f.name.replace("_", "-") for f in fields(FlowerSettings)}:
        raise ConfigError(f"unknown run-config keys {sorted(unknown)}")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stderr()
        settings = FlowerSettings.from_run_config({**context.run_config, **run_config})
        cfg = settings.load(app_dir(grid))
        run_dir = FedpruneStrategy(cfg, settings).start(grid)
        logging.getLogger("fedprune").info("run finished: %s", run_dir)

    return app


app = server_app()
