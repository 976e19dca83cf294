"""Failure injection (``[faults]``): which selected clients crash, hang, stay silent or send
a garbled payload in a round — drawn from (run seed, round, client id) alone, so a resumed run, the in-process
simulator and the SuperNodes draw the same faults."""

from __future__ import annotations

import numpy as np

from fedprune.config import FaultsConfig

KINDS = ("crash", "hang", "silent", "garbled")  # new kinds go last: earlier draws stay
REASONS = {"crash": "raised in its local work (injected crash)",
           "hang": "no reply before the round's deadline (injected hang)",
           "silent": "returned nothing (injected)"}  # garbled: the server's own rejection


class ClientFault(RuntimeError):
    """An injected client crash."""


def injected_fault(faults: FaultsConfig, seed: int, rnd: int, client_id: int) -> str | None:
    """The fault of ``client_id`` in round ``rnd`` (one of `KINDS`), or None."""
    if not faults.any:
        return None
    u = np.random.default_rng([seed, rnd, client_id, 0xFA17]).random()
    edge = 0.0
    for kind in KINDS:
        edge += getattr(faults, kind)
        if u < edge:
            return kind
    return None


def garble(payload: bytes) -> bytes:
    """A garbled upload: the client's payload cut in half (a torn transfer); the server's
    decoding rejects it."""
    return payload[: len(payload) // 2]
