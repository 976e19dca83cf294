"""The one aggregation rule: a coordinate-wise weighted mean over the clients that own each
coordinate (DESIGN.md "All three are one idea").

Every method is a weight builder over `owned_mean`: FedAvg (Eq. 5) weighs every tensor by
|D_c|; random head pruning (B2) by |D_c| times a 0/1 keep flag per head row / column; AoH
(Eq. 8) by the head importance alpha; FedSpaLLM's l0 mean by the element mask of the kept
weights; PruFed's HeteAgg by |D_c| over the clients whose (renamed) layers hold the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from fedprune.core.robust import MEAN, Combine, owner_statistic
from fedprune.core.update import ClientUpdate, State

Empty = Literal["keep", "zero"]


def owned_mean(global_state: State, updates: Sequence[ClientUpdate], server_lr: float = 1.0,
               eps: float | Mapping[str, float] = 0.0, empty: Empty = "keep",
               combine: Combine = MEAN) -> State:
    """For every global key g, over the updates that hold it (client-id order):

        g <- where(S > 0, g + eta * A / (S + eps), g  if empty == "keep" else 0)
        A = sum_c w_c * delta_c,   S = sum_c w_c   (w_c broadcast against delta_c)

    accumulated in float64 and cast back to g's dtype. A key no update holds keeps its value
    (whatever ``empty`` says: "zero" is for coordinates every owner pruned, FedSpaLLM).
    ``eps`` is one number or one per key (missing keys: 0). One key at a time, so the extra
    memory is two float64 tensors of the largest key. A robust ``combine`` (median,
    trimmed mean, Bulyan's; `core.robust`) puts that statistic of the owners' deltas (w_c > 0)
    in place of A / (S + eps). Inputs are never mutated.
    """
    ordered = sorted(updates, key=lambda u: u.client_id)
    held = [u.local_keys() for u in ordered]  # global -> local key
    new = {}
    for key, value in global_state.items():
        acc = total = None
        deltas, owners = [], []
        for update, local in zip(ordered, held, strict=True):
            if key not in local:
                continue
            w = update.weight(local[key])
            w = w.double() if isinstance(w, torch.Tensor) else float(w)
            delta = update.delta[local[key]].double()
            if combine.rule != "mean":
                deltas.append(delta)
                owners.append(torch.as_tensor(w > 0).expand(delta.shape))
            term = w * delta
            acc = term if acc is None else acc + term
            total = w if total is None else total + w
        if acc is None:
            new[key] = value.clone()
            continue
        e = eps.get(key, 0.0) if isinstance(eps, Mapping) else eps
        step = (acc / (total + e) if combine.rule == "mean" else
                owner_statistic(torch.stack(deltas), torch.stack(owners), combine))
        moved = value.double() + server_lr * step
        if isinstance(total, torch.Tensor) and not bool((total > 0).all()):
            fallback = value.double() if empty == "keep" else torch.zeros_like(moved)
            moved = torch.where(torch.as_tensor(total) > 0, moved, fallback)
        elif not isinstance(total, torch.Tensor) and total <= 0:
            moved = value.double() if empty == "keep" else torch.zeros_like(moved)
        new[key] = moved.to(value.dtype)
    return new


def ownership(global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Which coordinates some update owns: for every global key an update holds, the bool
    tensor S > 0 (S = sum_c w_c, broadcastable to the key's shape, as in `owned_mean`).
    Server optimizers step only there (`core.server_opt`)."""
    totals: dict[str, torch.Tensor] = {}
    for update in updates:
        for local in update.delta:
            key = update.global_key(local)
            if key not in global_state:
                continue
            w = torch.as_tensor(update.weight(local), dtype=torch.float64)
            totals[key] = w if key not in totals else totals[key] + w
    return {key: total > 0 for key, total in totals.items()}
