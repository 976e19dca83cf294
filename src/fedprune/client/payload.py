"""Wire format of a partial state dict: safetensors bytes, so measured sizes are real."""

from __future__ import annotations

from safetensors.torch import load, save

from fedprune.core.update import State


def encode(state: State) -> bytes:
    """Serialize a partial state dict (tensors made contiguous)."""
    return save({k: v.contiguous() for k, v in state.items()})


def decode(blob: bytes) -> State:
    return load(blob)
