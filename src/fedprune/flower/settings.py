"""Flower run config -> fedprune settings.

The experiment itself stays in `fedprune.config` (one source of truth): the run config only
names a fedprune TOML file and dotted overrides, exactly what `fedprune run` takes. The
remaining keys are about transport (where artifacts go, how long to wait for SuperNodes).
Keys are declared with their defaults in pyproject.toml `[tool.flwr.app.config]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedprune.config import ConfigError, ExperimentConfig, load_config


@dataclass(frozen=True)
class FlowerSettings:
    """What `flwr run --run-config` may set (run-config key = field name with '-')."""

    experiment: str = ""          # fedprune TOML: relative = inside the app; "" = defaults
    overrides: str = ""           # "section.key=value; section.key=value" (';'-separated)
    run_dir: str = ""             # artifacts folder; "" = <run.out_dir>/<run name>
    resume: bool = False          # continue run_dir from its last checkpoint
    reply_timeout: float = 600.0  # seconds a round waits for replies; later ones = dropped
    connect_timeout: float = 300.0  # seconds to wait until every partition's SuperNode is up

    def __post_init__(self) -> None:
        for key in ("reply_timeout", "connect_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"run config `{key.replace('_', '-')}` must be > 0 seconds, "
                                  f"got {getattr(self, key)!r}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerSettings:
        """Read the known keys; Flower itself rejects keys pyproject.toml does not declare."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values = {}
        for key, f in known.items():
            if key in run_config:
                value = run_config[key]
                values[f.name] = float(value) if f.type == "float" else value
        return cls(**values)

    def override_list(self) -> list[str]:
        """The ';'-separated overrides as `fedprune run` would receive them."""
        return [item.strip() for item in self.overrides.replace("\n", ";").split(";")
                if item.strip()]

    def experiment_path(self, app_dir: Path | None) -> Path | None:
        """A relative path names a file of the submitted app (`flwr run <app>` ships
        configs/*.toml in the FAB), so the ServerApp reads what the user edited; an
        absolute path is a file on the ServerApp's machine."""
        if not self.experiment:
            return None
        path = Path(self.experiment).expanduser()
        return path if path.is_absolute() or app_dir is None else app_dir / path

    def load(self, app_dir: Path | None = None) -> ExperimentConfig:
        """The experiment: the TOML file (if any) plus the overrides, validated by
        fedprune.config (errors name the option)."""
        return load_config(self.experiment_path(app_dir), self.override_list())
