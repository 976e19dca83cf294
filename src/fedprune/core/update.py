"""What a client sends back, and the checks every update passes before aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]  # partial state dict: module path -> tensor


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    ``delta`` holds local - global for every tensor the client trained and sends (a partial
    state dict keyed by parameter path). ``num_examples`` is |D_c|, ``loss`` the client's mean
    local training loss L_c. Head-pruning methods add ``head_weights``: attention path ->
    [n_heads] per-head weight (AoH: importance alpha, 0 for pruned heads).
    """

    client_id: int
    delta: State
    num_examples: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    head_weights: dict[str, torch.Tensor] | None = None


class InvalidUpdate(ValueError):
    """A client update that must not be aggregated; the message names client and reason."""


def validate_update(update: ClientUpdate, reference: State) -> None:
    """Reject an update whose keys, shapes, dtypes or values do not fit ``reference``.

    Raises InvalidUpdate naming the client and the first problem found.
    """
    cid = update.client_id

    def bad(reason: str) -> InvalidUpdate:
        return InvalidUpdate(f"client {cid}: {reason}")

    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        raise bad(f"num_examples must be a positive integer, got {update.num_examples!r}")
    if not isinstance(update.loss, (int, float)) or not math.isfinite(update.loss):
        raise bad(f"loss must be a finite number, got {update.loss!r}")
    if not update.delta:
        raise bad("empty update")
    for key, tensor in update.delta.items():
        if key not in reference:
            raise bad(f"unknown tensor {key!r}")
        ref = reference[key]
        if not isinstance(tensor, torch.Tensor):
            raise bad(f"{key!r} is not a tensor")
        if tensor.shape != ref.shape:
            raise bad(f"{key!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}")
        if tensor.dtype != ref.dtype:
            raise bad(f"{key!r} has dtype {tensor.dtype}, expected {ref.dtype}")
        if not torch.isfinite(tensor).all():
            raise bad(f"{key!r} has non-finite values")
    for path, w in (update.head_weights or {}).items():
        if not torch.isfinite(w).all() or (w < 0).any():
            raise bad(f"head weights of {path!r} must be finite and >= 0, got {w.tolist()}")
