"""Failure injection (``[faults]``): which selected clients crash, hang or stay silent in a
round — drawn from (run seed, round, client id) alone, so a resumed run, the in-process
simulator and the SuperNodes draw the same faults."""

from __future__ import annotations

import numpy as np

from fedprune.config import FaultsConfig

KINDS = ("crash", "hang", "silent")
REASONS = {"crash": "raised in its local work (injected crash)",
           "hang": "no reply before the round's deadline (injected hang)",
           "silent": "returned nothing (injected)"}


class ClientFault(RuntimeError):
    """An injected client crash."""


def injected_fault(faults: FaultsConfig, seed: int, rnd: int, client_id: int) -> str | None:
    """The fault of ``client_id`` in round ``rnd`` ("crash" | "hang" | "silent"), or None."""
    if not faults.any:
        return None
    u = np.random.default_rng([seed, rnd, client_id, 0xFA17]).random()
    edge = 0.0
    for kind in KINDS:
        edge += getattr(faults, kind)
        if u < edge:
            return kind
    return None
