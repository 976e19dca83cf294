"""A client's side of one round, the same in process and on a SuperNode: split the downlink,
run `Method.local` (with SCAFFOLD's correction when the downlink carries c; on flipped labels
for a label-flipping attacker), poison the result if the client is a simulated attacker, and
name the round it answers (the server refuses stale updates)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

from fedprune.client.attacks import flipped_labels, malicious, poison
from fedprune.client.scaffold import ControlStore, scaffold_local, split_control
from fedprune.core.update import State

if TYPE_CHECKING:
    from fedprune.methods.base import LocalResult, Method


def client_round(method: Method, received: State, client_id: int, seed: int, rnd: int,
                 store: ControlStore | None) -> LocalResult:
    """Client ``client_id``'s local work in round ``rnd`` on what it received."""
    start, control = split_control(received)
    cfg = method.cfg
    attack = cfg.attack
    bad = client_id in malicious(attack, cfg.federation.num_clients, cfg.run.seed)
    flip = (flipped_labels(method.fed, method.fed.client_indices[client_id],
                           len(method.fed.label_names))
            if bad and attack.kind == "label_flip" else nullcontext())
    with flip:
        result = (scaffold_local(method, start, control, client_id, seed, rnd, store)
                  if control else method.local(start, client_id, seed))
    if bad:
        result = poison(attack, result, seed)
    return replace(result, round=rnd)
