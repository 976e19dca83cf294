"""What a client sends back, and the checks every update passes before aggregation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]  # partial state dict: module path -> tensor
Weight = float | torch.Tensor     # a per-key aggregation weight that broadcasts to the delta


@dataclass
class ClientUpdate:
    """One client's contribution to a round: a partial state dict and how much it owns.

    ``delta`` holds local - global for every tensor the client trained and sends, keyed by
    the client's *local* parameter paths; ``keymap`` renames local keys to global ones (a
    layer-dropped model's layer 3 may be the global layer 7; identity when empty).
    ``weights[key]`` is the client's aggregation weight for that tensor, broadcasting
    against it: a scalar (|D_c|), a column [out, 1] or row [1, in] vector (per-head
    importance alpha, a 0/1 keep flag), or an element mask (l0). A key without an entry
    weighs |D_c|. ``num_examples`` is |D_c|, ``loss`` the mean local training loss L_c
    (None for a method whose clients do not train, e.g. FedSpaLLM's pruners). ``control``
    holds SCAFFOLD's Δc_i for the keys of ``delta`` (client/scaffold.py).
    """

    client_id: int
    delta: State
    num_examples: int
    loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    weights: dict[str, Weight] = field(default_factory=dict)
    keymap: dict[str, str] = field(default_factory=dict)
    control: State = field(default_factory=dict)  # SCAFFOLD: Δc_i, full-shaped, local keys
    round: int | None = None                       # the round the client says it answers

    def weight(self, key: str) -> Weight:
        return self.weights.get(key, float(self.num_examples))

    def global_key(self, key: str) -> str:
        return self.keymap.get(key, key)

    def local_keys(self) -> dict[str, str]:
        """global key -> local key of every tensor the update holds."""
        return {self.global_key(k): k for k in self.delta}


class InvalidUpdate(ValueError):
    """A client update that must not be aggregated; the message names client and reason."""


def validate_update(update: ClientUpdate, reference: Mapping[str, torch.Tensor],
                    num_examples: int | None = None, control: bool = False,
                    rnd: int | None = None) -> None:
    """Reject an update whose keys, shapes, dtypes, values or weights do not fit
    ``reference`` (global keys), or whose |D_c| differs from ``num_examples`` (what the
    server knows of the client's data, when it knows it). With ``control`` (SCAFFOLD) the
    update must hold a control-variate change for exactly the keys of its delta, checked
    like the delta; without, none. With ``rnd`` the update must say it answers that round
    (a stale or replayed update does not).

    Raises InvalidUpdate naming the client and the first problem found.
    """
    cid = update.client_id

    def bad(reason: str) -> InvalidUpdate:
        return InvalidUpdate(f"client {cid}: {reason}")

    if rnd is not None and update.round != rnd:
        raise bad(f"update for round {update.round}, this is round {rnd} (stale or replayed)")
    n = update.num_examples
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise bad(f"num_examples must be a positive integer, got {n!r}")
    if num_examples is not None and n != num_examples:
        raise bad(f"num_examples={n} but the server knows {num_examples} examples of it")
    loss = update.loss
    if loss is not None and (not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise bad(f"loss must be a finite number, got {loss!r}")
    if not update.delta:
        raise bad("empty update")
    if control and set(update.control) != set(update.delta):
        raise bad(f"SCAFFOLD needs a control-variate change for each of its "
                  f"{len(update.delta)} tensors, it sent {len(update.control)}")
    if not control and update.control:
        raise bad("sent control variates, but federation.scaffold is off")
    checked = [("", update.delta), ("control of ", update.control)]
    for what, key, tensor in ((w, k, t) for w, part in checked for k, t in part.items()):
        name = update.global_key(key)
        if name not in reference:
            raise bad(f"unknown tensor {name!r}")
        ref, label = reference[name], what + repr(name)
        if not isinstance(tensor, torch.Tensor):
            raise bad(f"{label} is not a tensor")
        if tensor.shape != ref.shape:
            raise bad(f"{label} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}")
        if tensor.dtype != ref.dtype:
            raise bad(f"{label} has dtype {tensor.dtype}, expected {ref.dtype}")
        if not torch.isfinite(tensor).all():
            raise bad(f"{label} has non-finite values")
    for key, w in update.weights.items():
        if key not in update.delta:
            raise bad(f"weight for {key!r}, which the update does not hold")
        w = torch.as_tensor(w)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise bad(f"weights of {update.global_key(key)!r} must be finite and >= 0")
        shape = update.delta[key].shape
        try:
            fits = torch.broadcast_shapes(w.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise bad(f"weights of {update.global_key(key)!r} of shape {tuple(w.shape)} do "
                      f"not broadcast to {tuple(shape)}")
