"""Blockwise weighted means: the aggregation maths shared by every head-pruned method.

A *block* is a set of coordinates that are kept or pruned together (one attention head's
slices of the trainable tensors). Each client gives each block a weight: its head importance
alpha for AoH (DESIGN.md Eq. 8), |D_c| times a 0/1 keep flag for random head pruning (B2).
Coordinates outside every block are averaged by data size (Eq. 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedprune.core.aggregate import weighted_delta
from fedprune.core.update import ClientUpdate, State


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0) or columns (dim 1) start:stop of the tensor ``key``."""

    key: str
    dim: int
    start: int
    stop: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


Block = tuple[Slice, ...]


def block_mask(blocks: Sequence[Block], keep: torch.Tensor, shapes: dict[str, torch.Size]
               ) -> dict[str, torch.Tensor]:
    """Boolean masks over the block-mapped tensors: True on the slices of kept blocks.
    ``keep`` is a bool vector [n_blocks]."""
    masks = {s.key: torch.zeros(shapes[s.key], dtype=torch.bool)
             for block in blocks for s in block}
    for block, kept in zip(blocks, keep.tolist(), strict=True):
        if kept:
            for s in block:
                s.of(masks[s.key]).fill_(True)
    return masks


def blockwise_mean(global_state: State, updates: Sequence[ClientUpdate], server_lr: float,
                   blocks: Sequence[Block], weights: torch.Tensor, eps: float) -> State:
    """p_b <- p_b + eta * sum_c w_cb dp_cb / (sum_c w_cb + eps) for every block b, and Eq. 5
    (data-size mean over the clients that sent the tensor) for all other coordinates.

    ``weights``: [n_clients, n_blocks], row c for ``updates[c]``; a client that pruned block b
    has w_cb = 0, so its (absent) values never enter. A block whose weights are all zero does
    not move. Updates are summed in client-id order; inputs are never mutated.
    """
    order = sorted(range(len(updates)), key=lambda i: updates[i].client_id)
    updates = [updates[i] for i in order]
    weights = weights[order].double()
    new = {}
    for key, value in global_state.items():  # Eq. 5 everywhere first
        delta = weighted_delta(updates, key)
        new[key] = value.clone() if delta is None else (
            value.double() + server_lr * delta).to(value.dtype)
    for b, block in enumerate(blocks):  # then overwrite block coordinates by Eq. 8
        w = weights[:, b]
        total = w.sum()
        for s in block:
            base = s.of(global_state[s.key]).double()
            if total <= 0:
                s.of(new[s.key]).copy_(base)
                continue
            acc = sum(w[c] * s.of(u.delta[s.key]).double()
                      for c, u in enumerate(updates) if w[c] > 0)
            s.of(new[s.key]).copy_(base + server_lr * acc / (total + eps))
    return new
