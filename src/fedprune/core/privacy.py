"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with server-side
fixed clipping, on the coordinates each client owns (issue 15).

Per round, over the valid updates c and for every global trainable key g:

    g <- g + eta * (sum_c w_c * clip_C(delta_c) + N(0, (z C)^2 I)) / m

- ``clip_C`` scales a client's whole update (every tensor it sends, over the coordinates it
  owns) to an L2 norm of at most C, so one client moves the sum by at most C;
- ``w_c`` is the method's weight clamped to [0, 1]: |D_c| weights become ownership flags (the
  uniform DP-FedAvg mean; |D_c| itself would make the sensitivity data-dependent), AoH's head
  importance alpha in [0, 1] stays, so head weighting survives with the bound intact;
- ``m`` is the expected number of clients per round (fixed, not the number that answered: a
  data-dependent denominator would leak); noise goes on every coordinate of every trainable
  key, owned this round or not, so the release does not show which coordinates were trained.

The privacy spent is the RDP of the subsampled Gaussian mechanism with noise multiplier z,
sampling rate q = K / N and one step per round, converted to (epsilon, delta) by Opacus'
accountant: exact for ``federation.selection = "poisson"``; for "random" (exactly K without
replacement) it is the usual Poisson approximation (as TensorFlow Federated's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from fedprune.core.robust import clip
from fedprune.core.update import ClientUpdate, State

NOISE_STREAM = 2  # round_rng stream of the server's DP noise (0: selection)


def bounded(update: ClientUpdate) -> ClientUpdate:
    """The update with every tensor's weight clamped to [0, 1] (a key without an entry weighs
    1: its weight would be |D_c| >= 1)."""
    weights = {k: (w.clamp(0.0, 1.0) if isinstance(w, torch.Tensor) else min(max(w, 0.0), 1.0))
               for k, w in update.weights.items()}
    return replace(update, weights={**dict.fromkeys(update.delta, 1.0), **weights})


def dp_mean(global_state: State, updates: Sequence[ClientUpdate], clip_norm: float,
            noise_multiplier: float, expected_clients: float, rng: np.random.Generator,
            server_lr: float = 1.0) -> State:
    """The noised, clipped, fixed-denominator mean above (float64, cast back to each key's
    dtype); the noise is drawn key by key in sorted key order from ``rng``, so a seeded
    generator makes a round reproducible. Inputs are never mutated."""
    ordered = [bounded(clip(u, clip_norm)) for u in sorted(updates, key=lambda u: u.client_id)]
    held = [u.local_keys() for u in ordered]
    new = {}
    std = noise_multiplier * clip_norm
    for key in sorted(global_state):  # a fixed order: a resumed state's may differ
        value = global_state[key]
        total = torch.zeros(value.shape, dtype=torch.float64)
        for update, local in zip(ordered, held, strict=True):
            if key in local:
                w = update.weight(local[key])
                total += (w.double() if isinstance(w, torch.Tensor) else w) * \
                    update.delta[local[key]].double()
        if std > 0:
            total += torch.from_numpy(rng.normal(0.0, std, size=tuple(value.shape)))
        new[key] = (value.double() + server_lr * total / expected_clients).to(value.dtype)
    return {key: new[key] for key in global_state}


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of ``rounds`` subsampled Gaussian releases (Opacus' RDP accountant);
    inf without noise, 0 before the first round."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant  # imports scipy: only when DP is on

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))
