"""The ServerApp: resolve the experiment from the run config, run the fedprune round loop."""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune.flower.settings import FlowerSettings
from fedprune.flower.strategy import FedpruneStrategy

app = ServerApp()


def _log_to_stderr() -> None:
    """fedprune's INFO lines (rounds, drops) reach `flwr run --stream` / `flwr log` only
    through the process output Flower mirrors; the logger has no handler by default."""
    logger = logging.getLogger("fedprune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fedprune %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stderr()
    settings = FlowerSettings.from_run_config(context.run_config)
    cfg = settings.load()
    run_dir = FedpruneStrategy(cfg, settings).start(grid)
    logging.getLogger("fedprune").info("run finished: %s", run_dir)
