"""Atomic per-round checkpoints: one safetensors file holding the global trainable state and,
in its metadata, the small JSON server state (round, per-client state)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save

from fedprune.core.update import State

CHECKPOINT = "checkpoint.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read back; the message names the file."""


def save_checkpoint(run_dir: Path, state: State, server: dict[str, Any]) -> Path:
    """Write to a temp file, fsync, rename: a crash leaves the previous checkpoint intact. A
    failed write (disk full, folder gone) removes the temp file and raises CheckpointError:
    the previous checkpoint is still the one a resume reads."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    blob = save({k: v.contiguous() for k, v in state.items()},
                metadata={"server": json.dumps(server)})
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.is_file() else "no checkpoint yet"
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); "
                              f"{kept}: free space and resume with --resume") from None
    return path


def load_checkpoint(run_dir: Path) -> tuple[State, dict[str, Any]] | None:
    """The last checkpoint's (global state, server state JSON); None when there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no dict)
            server = json.loads(f.metadata()["server"])
    except Exception as e:  # noqa: BLE001 - whatever safetensors or json raise
        raise CheckpointError(f"--resume: checkpoint {path} is corrupt or not a fedprune "
                              f"checkpoint ({type(e).__name__}: {e}); start a new run or "
                              f"restore the file") from None
    return state, server
