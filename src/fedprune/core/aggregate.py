"""Aggregation rules: pure functions over partial state dicts, one signature, one registry.

Every rule maps (global state, valid updates, server learning rate) -> new global state and
never mutates its inputs. Updates are consumed in client-id order so that the result does not
depend on the order in which they arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedprune.core.update import ClientUpdate, State

Aggregator = Callable[[State, Sequence[ClientUpdate], float], State]
AGGREGATORS: dict[str, Aggregator] = {}


def register(name: str) -> Callable[[Aggregator], Aggregator]:
    def wrap(fn: Aggregator) -> Aggregator:
        AGGREGATORS[name] = fn
        return fn
    return wrap


def weighted_delta(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor | None:
    """sum_c |D_c| * delta_c[key] / sum_c |D_c| over the clients that sent ``key``
    (float64 accumulation, so the result is independent of summation order to ~1e-16)."""
    owners = sorted((u for u in updates if key in u.delta), key=lambda u: u.client_id)
    if not owners:
        return None
    total = sum(u.num_examples for u in owners)
    acc = sum(u.delta[key].double() * u.num_examples for u in owners)
    return acc / total


@register("fedavg")
def fedavg(global_state: State, updates: Sequence[ClientUpdate], server_lr: float) -> State:
    """FedAvg with a server learning rate (DESIGN.md Eq. 5):
    p <- p + eta * sum_c |D_c| dp_c / sum_c |D_c|. Tensors no client sent stay unchanged."""
    new = {}
    for key, value in global_state.items():
        delta = weighted_delta(updates, key)
        new[key] = value.clone() if delta is None else (value.double() + server_lr * delta).to(
            value.dtype)
    return new
