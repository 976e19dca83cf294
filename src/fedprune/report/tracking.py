"""Experiment trackers of a run (`[tracking]`, off by default): TensorBoard event files and
MLflow, both offline.

The round loop makes two calls: `log_round(cfg, run_dir, record)` after each metrics.jsonl
line and `log_final(cfg, run_dir)` after the final artefacts. Each round, every enabled
tracker gets the record's scalars (`round_scalars`) at step = round; the first call logs the
resolved config (TensorBoard: a TOML text; MLflow: one param per ``section.key``); the last
one logs the final artefacts (MLflow: the run directory's files; TensorBoard: the metric plot
and report.md) and closes. Both libraries are the optional ``tracking`` extra, imported only
when enabled: fedprune runs without them, and an enabled tracker that is not installed is a
ConfigError naming its option.

MLflow's default store is a local file store at ``<run dir>/mlruns`` (no server): MLflow 3
keeps that backend in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is
set, which is done here for file URIs; telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY``)
unless the environment says otherwise. The MLflow run id is kept in ``<run dir>/tracking.json``
so that ``--resume`` continues the same MLflow run. Weights & Biases is not supported: it
needs an account and its offline mode still writes for a later sync; the two above cover
offline use.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any, Protocol

import tomli_w

from fedprune.config import ConfigError

if TYPE_CHECKING:
    from fedprune.config import ExperimentConfig

SKIPPED = {"round"}  # the step itself
ARTEFACTS = ("config.json", "config.toml", "environment.json", "partition.json",
             "resources.json", "metrics.jsonl", "metrics.csv", "report.md",
             "global.safetensors")


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """What a tracker logs of one metrics.jsonl record: every numeric top-level value (None
    and booleans skipped), per-client means of the byte lists (``bytes_up_per_client``), the
    counts of selected and rejected clients, and each client metric's mean over the clients
    that report it (``client/<name>``)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in SKIPPED:
            continue
        if _number(value):
            out[key] = float(value)
        elif key in ("bytes_up", "bytes_down") and value:
            out[f"{key}_per_client"] = float(mean(value))
    out["clients_selected"] = float(len(record.get("selected", [])))
    out["clients_rejected"] = float(len(record.get("rejected", [])))
    per_client = list(record.get("client_metrics", {}).values())
    names = sorted({k for m in per_client for k, v in m.items() if _number(v)})
    for name in names:
        out[f"client/{name}"] = float(mean(m[name] for m in per_client if _number(m.get(name))))
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config tables -> ``{"section.key": str(value)}`` (method sections nest one
    level deeper: ``method.aoh.sparsity``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def _require(module: str, option: str, package: str):
    """Import ``module`` or raise a ConfigError naming the option that needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"`{option}` = true needs {package}, which is not installed ({e}); "
                          f"pip install 'fedprune[tracking]' or set {option} = false") from None


class Tracker(Protocol):
    def log_round(self, step: int, scalars: dict[str, float]) -> None: ...

    def finish(self, run_dir: Path) -> None: ...


class TensorBoard:
    """Event files under ``<run dir>/tensorboard`` (torch's SummaryWriter), flushed every
    round so that a live TensorBoard or a crash sees every finished round."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        module = _require("torch.utils.tensorboard", "tracking.tensorboard", "tensorboard")
        self.writer = module.SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```toml\n" + tomli_w.dumps(config) + "```")

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, run_dir: Path) -> None:
        from matplotlib.image import imread

        for png in sorted(run_dir.glob("*.png")):  # the metric plot: [H, W, RGB(A)] floats
            self.writer.add_image(png.stem, imread(png)[..., :3], dataformats="HWC")
        if (run_dir / "report.md").is_file():
            self.writer.add_text("report", (run_dir / "report.md").read_text())
        self.writer.close()


class MLflow:
    """One MLflow run per fedprune run, through the stateless `MlflowClient` (no global
    active run): params = the resolved config, metrics per round, artefacts at the end."""

    def __init__(self, run_dir: Path, config: dict[str, Any], uri: str,
                 experiment: str) -> None:
        uri = uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        tracking = _require("mlflow.tracking", "tracking.mlflow", "mlflow (mlflow-skinny)")
        from mlflow.entities import Param

        self.client = tracking.MlflowClient(tracking_uri=uri)
        self.run_id = self._run_id(run_dir, experiment, config)
        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, v) for k, v in flat_params(config).items() if k not in have]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _run_id(self, run_dir: Path, experiment: str, config: dict[str, Any]) -> str:
        """The run id recorded in tracking.json (a resumed run continues it), else a new run
        in ``experiment`` (created when missing)."""
        record = run_dir / "tracking.json"
        saved = json.loads(record.read_text()).get("mlflow_run_id") if record.is_file() else None
        if saved is not None:
            return saved
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(experiment))
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"fedprune.method": config["method"]["name"]})
        record.write_text(json.dumps({"mlflow_run_id": run.info.run_id}))
        return run.info.run_id

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, run_dir: Path) -> None:
        for name in (*ARTEFACTS, *sorted(p.name for p in run_dir.glob("*.png"))):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_terminated(self.run_id, "FINISHED")


_OPEN: dict[Path, list[Tracker]] = {}  # run directory -> its open trackers (this process)


def _open(cfg: ExperimentConfig, run_dir: Path) -> list[Tracker]:
    """The run's enabled trackers, opened once per process and run directory."""
    key = Path(run_dir).resolve()
    if key not in _OPEN:
        t, config = cfg.tracking, cfg.to_dict()
        trackers: list[Tracker] = []
        if t.tensorboard:
            trackers.append(TensorBoard(key, config))
        if t.mlflow:
            trackers.append(MLflow(key, config, t.mlflow_uri, t.mlflow_experiment))
        _OPEN[key] = trackers
    return _OPEN[key]


def enabled(cfg: ExperimentConfig) -> bool:
    return cfg.tracking.tensorboard or cfg.tracking.mlflow


def log_round(cfg: ExperimentConfig, run_dir: Path, record: dict[str, Any]) -> None:
    """Log one round's record to every enabled tracker (nothing when none is)."""
    if not enabled(cfg):
        return
    scalars = round_scalars(record)
    for tracker in _open(cfg, run_dir):
        tracker.log_round(int(record["round"]), scalars)


def log_final(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Log the final artefacts and close the run's trackers."""
    if not enabled(cfg):
        return
    trackers = _open(cfg, run_dir)
    del _OPEN[Path(run_dir).resolve()]
    for tracker in trackers:
        tracker.finish(Path(run_dir))
