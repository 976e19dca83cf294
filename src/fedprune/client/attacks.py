"""Simulated attackers (``[attack]``, issue 15): a seeded fraction of the clients is malicious
for the whole run and sends, in place of its honest update Δ:

    sign_flip        -Δ
    scaling          scale · Δ
    noise            Δ + N(0, noise_std²) on every coordinate it owns
    alie             μ - z · σ   "a little is enough" (Baruch et al. 2019): μ, σ the
                     coordinate-wise mean and std of this round's honest updates, z from n
                     and the number of attackers m as in the paper (or ``alie_z``)
    ipm              -scale · μ   inner-product manipulation (Xie et al. 2020)
    label_flip       trains honestly on labels y -> K - 1 - y (data poisoning)
    alpha_inflation  AoH: claims the largest importance (1) for every head it kept

alie and ipm are omniscient and collusive (they read the honest updates of the round), so
they exist in the in-process simulator only. Coordinates an attacker does not own (heads it
pruned) stay 0: the attack lives inside the method's wire format and its checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedprune.config import AttackConfig
from fedprune.methods.heads import ALPHA  # the head-weight wire suffix

if TYPE_CHECKING:
    from fedprune.client.world import Federation
    from fedprune.methods.base import LocalResult

COLLUSIVE = ("alie", "ipm")


def malicious(attack: AttackConfig, num_clients: int, seed: int) -> frozenset[int]:
    """The attackers: round(fraction · N) client ids, drawn once per run seed."""
    if attack.kind == "none":
        return frozenset()
    count = round(attack.fraction * num_clients)
    order = np.random.default_rng([seed, 0xBAD]).permutation(num_clients)
    return frozenset(int(c) for c in order[:count])


def alie_z(n: int, m: int) -> float:
    """Baruch et al.'s z: the largest z such that s = floor(n/2 + 1) - m honest clients lie
    farther from the mean: z = Φ⁻¹((n - s) / n)."""
    s = math.floor(n / 2 + 1) - m
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def poison(attack: AttackConfig, result: LocalResult, seed: int) -> LocalResult:
    """A malicious client's own (non-collusive) update attack."""
    kind, delta = attack.kind, result.delta
    if kind == "sign_flip":
        return replace(result, delta={k: -d for k, d in delta.items()})
    if kind == "scaling":
        return replace(result, delta={k: attack.scale * d for k, d in delta.items()})
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        return replace(result, delta={  # owned coordinates: those it changed
            k: d + attack.noise_std * torch.randn(d.shape, generator=gen, dtype=d.dtype)
            * (d != 0) for k, d in delta.items()})
    if kind == "alpha_inflation":
        return replace(result, extra={k: torch.where(a > 0, 1.0, 0.0).to(a.dtype)
                                      if k.endswith(ALPHA) else a
                                      for k, a in result.extra.items()})
    return result


def collude(attack: AttackConfig, honest: list[LocalResult], mine: LocalResult,
            attackers: int) -> LocalResult:
    """ALIE / IPM from the round's honest updates (same keys: one layout for all clients)."""
    if not honest:
        return mine
    out = {}
    for key, d in mine.delta.items():
        stack = torch.stack([h.delta[key].double() for h in honest])
        mu = stack.mean(0)
        if attack.kind == "ipm":
            value = -attack.scale * mu
        else:
            n = len(honest) + attackers
            z = attack.alie_z or alie_z(n, attackers)
            sigma = stack.std(0, unbiased=False)
            value = mu - z * sigma
        out[key] = (value * (d != 0)).to(d.dtype)  # only what the attacker owns
    return replace(mine, delta=out)


@contextmanager
def flipped_labels(fed: Federation, indices, num_labels: int) -> Iterator[None]:
    """The client's training rows with labels y -> K - 1 - y, restored afterwards."""
    saved = {int(i): fed.train_rows[int(i)] for i in indices}
    try:
        for i, row in saved.items():
            fed.train_rows[i] = {**row, "label": num_labels - 1 - int(row["label"])}
        yield
    finally:
        for i, row in saved.items():
            fed.train_rows[i] = row
