"""Atomic per-round checkpoints: one safetensors file holding the global trainable state and,
in its metadata, the small JSON server state (round, per-client state) and a SHA-256 of both.

The previous round's checkpoint is kept beside it (``checkpoint.prev.safetensors``): a torn,
truncated or tampered checkpoint (its content no longer matches its hash) is never loaded — the
previous one is, with a warning, and the round after it is redone (bit-identically)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from fedprune.core.update import State

CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
log = logging.getLogger("fedprune")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read back; the message names the file."""


def save_checkpoint(run_dir: Path, state: State, server: dict[str, Any]) -> Path:
    """Write to a temp file, fsync, rename: a crash leaves the previous checkpoint intact. A
    failed write (disk full, folder gone) removes the temp file and raises CheckpointError:
    the previous checkpoint is still the one a resume reads."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    text = json.dumps(server)
    blob = save({k: v.contiguous() for k, v in state.items()},
                metadata={"server": text, "sha256": digest(state, text)})
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.is_file() else "no checkpoint yet"
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); "
                              f"{kept}: free space and resume with --resume") from None
    return path


def digest(state: State, server_text: str) -> str:
    """SHA-256 of the server JSON and every tensor (key, dtype, shape, bytes; sorted keys)."""
    h = hashlib.sha256(server_text.encode())
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path) -> tuple[State, dict[str, Any]]:
    """One checkpoint file, verified against its hash; CheckpointError if it is not sound."""
    try:
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no dict)
            meta = f.metadata() or {}
        text, stored = meta["server"], meta.get("sha256")
        server = json.loads(text)
    except Exception as e:  # noqa: BLE001 - whatever safetensors or json raise
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fedprune checkpoint "
                              f"({type(e).__name__}: {e})") from None
    if stored is None:  # written by a fedprune before content hashes: cannot be verified
        log.warning("checkpoint %s has no content hash (an older fedprune wrote it): loaded "
                    "unverified", path)
    elif stored != digest(state, text):
        raise CheckpointError(f"checkpoint {path} does not match its content hash (torn or "
                              f"tampered)")
    return state, server


def load_checkpoint(run_dir: Path) -> tuple[State, dict[str, Any]] | None:
    """The last sound checkpoint's (global state, server state JSON): the newest, else the
    previous one (logged); None when there is none; CheckpointError when none is sound."""
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            ckpt = _read(path)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            log.warning("%s; resuming from %s (round %s) instead", errors[0], path,
                        ckpt[1].get("round"))
        return ckpt
    if errors:
        raise CheckpointError(f"--resume: {'; '.join(errors)}; no sound checkpoint is left: "
                              f"start a new run or restore the file")
    return None
