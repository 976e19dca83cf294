"""Client selection policies: one signature, one registry.

A policy maps (round, history, K, seed) -> sorted client ids. Randomness comes from a
generator seeded by (seed, round), so a resumed run selects exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class History:
    """What the server knows when it selects: per-client last local loss L_c (only clients
    that took part), the global validation loss L_g after the previous round, data sizes."""

    sizes: np.ndarray                      # [C] |D_c|
    client_loss: dict[int, float] = field(default_factory=dict)
    global_loss: float | None = None

    @property
    def num_clients(self) -> int:
        return len(self.sizes)


Selector = Callable[[int, History, int, int], list[int]]
SELECTORS: dict[str, Selector] = {}


def register(name: str) -> Callable[[Selector], Selector]:
    def wrap(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn
    return wrap


def round_rng(seed: int, rnd: int, stream: int = 0) -> np.random.Generator:
    """Independent generator per (seed, round, stream)."""
    return np.random.default_rng([seed, rnd, stream])


def _top_k(ids: np.ndarray, scores: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """The k ids with the highest scores; ties broken by a seeded random order."""
    shuffle = rng.permutation(len(ids))
    order = shuffle[np.argsort(-scores[shuffle], kind="stable")]
    return sorted(int(i) for i in ids[order[:k]])


def _last_loss(history: History, ids: np.ndarray, offset: float) -> np.ndarray:
    """L_c - offset for every id; never-seen clients score +inf."""
    return np.array([history.client_loss.get(int(c), np.inf) - offset for c in ids])


@register("random")
def random_selection(rnd: int, history: History, k: int, seed: int) -> list[int]:
    """K distinct clients uniformly at random (O(K) expected for K << C)."""
    return _distinct(round_rng(seed, rnd), history.num_clients, k)


def _distinct(rng: np.random.Generator, c: int, k: int) -> list[int]:
    """k distinct ids of range(c), uniformly, sorted."""
    if k * 4 >= c:
        return sorted(rng.choice(c, size=k, replace=False).tolist())
    chosen: set[int] = set()
    while len(chosen) < k:  # rejection sampling
        chosen.add(int(rng.integers(c)))
    return sorted(chosen)


@register("poisson")
def poisson_selection(rnd: int, history: History, k: int, seed: int) -> list[int]:
    """Every client independently with probability q = K / C (Poisson sampling, as DP-FedAvg's
    accountant assumes): a Binomial(C, q) count, then that many distinct clients uniformly —
    the same law, in O(K) expected."""
    rng, c = round_rng(seed, rnd), history.num_clients
    return _distinct(rng, c, int(rng.binomial(c, k / c)))


@register("loss")
def loss_selection(rnd: int, history: History, k: int, seed: int) -> list[int]:
    """AoH Eq. 9: S = top-K clients by L_c - L_g; never-seen clients first (+inf), ties broken
    by the seeded generator."""
    ids = np.arange(history.num_clients)
    offset = history.global_loss if history.global_loss is not None else 0.0
    return _top_k(ids, _last_loss(history, ids, offset), k, round_rng(seed, rnd))


@register("pow-d")
def power_of_choice(rnd: int, history: History, k: int, seed: int, d: int = 0) -> list[int]:
    """Power-of-Choice (Cho, Wang, Joshi, AISTATS 2022), rpow-d variant: draw d candidates
    without replacement with probability proportional to |D_c|, keep the K whose last reported
    local loss is highest (never-seen first). d defaults to 2K."""
    rng, c = round_rng(seed, rnd), history.num_clients
    d = min(c, d or 2 * k)
    p = history.sizes / history.sizes.sum()
    candidates = rng.choice(c, size=d, replace=False, p=p)
    return _top_k(candidates, _last_loss(history, candidates, 0.0), k, rng)
