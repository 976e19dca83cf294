"""SCAFFOLD (Karimireddy et al. 2020, *Stochastic Controlled Averaging*, Algorithm 1,
option II): drift correction with a server control variate c and one c_i per client.

Each round the server sends c beside the global state x (wire keys ``scaffold::<key>``);
the client trains from y = x with every step followed by y <- y - η_l (c - c_i) (the
correction of option II applied after the local optimizer's step, so that it holds for
AdamW as for SGD, as OpenFedLLM does), then

    c_i+ = c_i - c + (x - y) / (K η_l)         K = local steps, η_l = federation.lr
    Δc_i = c_i+ - c_i                           sent beside Δy (its bytes counted)

and the server, after aggregating Δy as usual, steps c <- c + (1/N) Σ_{i∈S} Δc_i (N =
federation.num_clients). Coordinates a client did not train (the slices of heads it pruned)
are neither corrected nor updated: its Δc_i is 0 there. c is checkpointed beside the global
state; each c_i lives on the client's side in a `ControlStore` (a file per client, created
at its first participation), so memory stays flat in the number of clients.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from fedprune.core.update import ClientUpdate, State

if TYPE_CHECKING:
    from fedprune.methods.base import LocalResult, Method

WIRE = "scaffold::"     # downlink: c; uplink: Δc_i (local keys, the method's wire layout)
SERVER = "scaffold::"   # checkpoint keys of the server's c: scaffold::<global key>


def server_control(state: State, moments: State) -> State:
    """The server's c for every key of the global state (zeros until a key first moves)."""
    return {k: moments[SERVER + k] if SERVER + k in moments else torch.zeros_like(v)
            for k, v in state.items()}


def with_control(downlink: State, control: State) -> State:
    return {**downlink, **{WIRE + k: v for k, v in control.items()}}


def split_control(received: State) -> tuple[State, State]:
    """(the method's downlink, the server's c in its local keys)."""
    control = {k.removeprefix(WIRE): v for k, v in received.items() if k.startswith(WIRE)}
    return {k: v for k, v in received.items() if not k.startswith(WIRE)}, control


def local_steps(num_examples: int, epochs: int, batch_size: int) -> int:
    """K: local_train's optimizer steps (every epoch, ceil(|D_c| / batch size) batches)."""
    return epochs * math.ceil(num_examples / batch_size)


class ControlStore:
    """Each client's c_i as safetensors files ``<client>.r<round>.safetensors`` under
    ``root``. A round reads the newest version written *before* it, so a round redone after
    a crash reads what it read the first time (resume stays bit-identical); writing round r
    removes the versions older than the one it read (at most two files per client)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _versions(self, client_id: int) -> list[tuple[int, Path]]:
        pattern = re.compile(rf"{client_id}\.r(\d+)\.safetensors")
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := pattern.fullmatch(p.name))]
        return sorted(found)

    def load(self, client_id: int, rnd: int) -> State | None:
        before = [p for r, p in self._versions(client_id) if r < rnd]
        return load_file(before[-1]) if before else None

    def save(self, client_id: int, rnd: int, control: State) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{client_id}.r{rnd}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in control.items()}, tmp)
        os.replace(tmp, path)
        read = [r for r, _ in self._versions(client_id) if r < rnd]
        for r, p in self._versions(client_id):
            if read and r < read[-1]:
                p.unlink(missing_ok=True)


def scaffold_local(method: Method, start: State, control: State, client_id: int, seed: int,
                   rnd: int, store: ControlStore | None) -> LocalResult:
    """`Method.local` with SCAFFOLD's correction by c - c_i, then c_i's update: the result
    carries Δc_i (``control``) and the store the new c_i."""
    if store is None:
        raise ValueError(f"client {client_id}: the downlink carries SCAFFOLD control variates "
                         f"but this client has no control-variate store")
    mine = store.load(client_id, rnd) or {k: torch.zeros_like(v) for k, v in control.items()}
    spec = method.spec
    method.spec = replace(spec, correction={k: control[k] - mine[k] for k in control})
    try:
        result = method.local(start, client_id, seed)
    finally:
        method.spec = spec
    scale = 1.0 / (local_steps(result.num_examples, spec.epochs, spec.batch_size) * spec.lr)
    trained = method.trained_mask(result)
    change = {}
    for key, c in control.items():
        dc = -c - result.delta[key] * scale          # c_i+ - c_i
        change[key] = dc * trained[key] if key in trained else dc
    store.save(client_id, rnd, {k: mine[k] + change[k] for k in control})
    return replace(result, control=change)


def control_step(moments: State, state: State, valid: list[ClientUpdate],
                 num_clients: int) -> State:
    """c <- c + (1/N) Σ Δc_i over the valid updates (global keys, float64 sums in client-id
    order, stored float32); the other entries of ``moments`` are kept."""
    sums: dict[str, torch.Tensor] = {}
    for u in sorted(valid, key=lambda u: u.client_id):
        for key, dc in u.control.items():
            g = u.global_key(key)
            sums[g] = sums.get(g, torch.zeros(state[g].shape, dtype=torch.float64)) + dc.double()
    out = dict(moments)
    for g, total in sums.items():
        c = moments.get(SERVER + g, torch.zeros(state[g].shape)).double()
        out[SERVER + g] = (c + total / num_clients).float()
    return out
