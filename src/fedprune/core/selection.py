"""Client selection policies: one signature, one registry.

A policy maps (round, number of clients, K, seed) -> sorted client ids. Randomness comes from
a generator seeded by (seed, round), so a resumed run selects exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Selector = Callable[[int, int, int, int], list[int]]
SELECTORS: dict[str, Selector] = {}


def register(name: str) -> Callable[[Selector], Selector]:
    def wrap(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn
    return wrap


def round_rng(seed: int, rnd: int, stream: int = 0) -> np.random.Generator:
    """Independent generator per (seed, round, stream)."""
    return np.random.default_rng([seed, rnd, stream])


@register("random")
def random_selection(rnd: int, num_clients: int, k: int, seed: int) -> list[int]:
    """K distinct clients uniformly at random (cost O(K), not O(C), for large C)."""
    rng = round_rng(seed, rnd)
    if k * 4 >= num_clients:
        return sorted(rng.choice(num_clients, size=k, replace=False).tolist())
    chosen: set[int] = set()
    while len(chosen) < k:  # rejection sampling: O(K) expected when K << C
        chosen.add(int(rng.integers(num_clients)))
    return sorted(chosen)
